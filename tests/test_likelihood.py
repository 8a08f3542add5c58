"""The likelihood family (best_of_n, best_of_n_neg, rwr): loss math, every script end to end, learning, determinism."""

import math

import pytest
import torch
from conftest import EOS, PAD, SMOKE_TASKS, TASKS, load_script, room, run, smoke, train

BON_KEYS = ["logps/best", "logps/worst", "train/pairs_kept", "objective/proxy_reward"]
KEYS = {"best_of_n": BON_KEYS, "best_of_n_neg": BON_KEYS,
        "rwr": BON_KEYS + ["train/weight_mean", "train/weight_max", "train/weight_clipped_frac"]}


class T:  # the task attributes sequence_logprobs and response_mask read
    pad_token_id, eos_token_id, temperature = PAD, EOS, 1.0


# two prompts (one left-padded), a best and a worst completion each, of different widths and lengths
Q = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
BEST = torch.tensor([[10, 11, EOS, PAD], [12, 13, 14, EOS]])
WORST = torch.tensor([[15, EOS], [16, 17]])  # the second never ends: every token counts


def token_mean_logps(model, prompts, responses):
    """Reference: the model's own logits, one unpadded row at a time, pad banned -> [P] token-mean log-probs."""
    out = []
    for prompt, resp in zip(prompts, responses):
        logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : -1]
        logits[:, PAD] = float("-inf")
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None]).mean())
    return torch.stack(out)


def losses_on(module, model, worst, beta=None, floor=None):
    """The training loss of best_of_n / best_of_n_neg on (Q, BEST, worst), exactly as the scripts compute it."""
    chosen_logps, rejected_logps = module.sequence_logprobs(model, T, Q, BEST, worst)
    losses = module.best_of_n_loss(chosen_logps, module.response_mask(BEST, PAD, EOS).sum(1))
    if beta is not None:
        losses = losses + module.negative_loss(rejected_logps, module.response_mask(worst, PAD, EOS).sum(1), beta, floor)
    return losses


def test_best_of_n_loss_is_the_token_mean_nll_of_the_best_alone(tiny_lm):
    bon = load_script("best_of_n")
    logps, lengths = -10 * torch.rand(6), torch.tensor([0, 1, 2, 3, 7, 9])
    torch.testing.assert_close(bon.best_of_n_loss(logps, lengths), -logps / lengths.clamp(min=1))  # no division by zero
    assert bon.response_mask(BEST, PAD, EOS).sum(1).tolist() == [3, 4]  # pads excluded, EOS counted
    with torch.no_grad():
        expected = -token_mean_logps(tiny_lm, [[5, 6], [7, 8, 9]], [[10, 11, EOS], [12, 13, 14, EOS]])
        torch.testing.assert_close(losses_on(bon, tiny_lm, WORST), expected, atol=1e-5, rtol=1e-5)
    # the worst completion shares the forward pass (for logps/worst) but gets exactly zero gradient, and the
    # parameter gradient is the same whatever the worst completion is (wider, shorter: the best is re-padded)
    chosen_logps, rejected_logps = bon.sequence_logprobs(tiny_lm, T, Q, BEST, WORST)
    loss = bon.best_of_n_loss(chosen_logps, bon.response_mask(BEST, PAD, EOS).sum(1)).mean()
    (g,) = torch.autograd.grad(loss, [rejected_logps], allow_unused=True, materialize_grads=True)
    assert torch.equal(g, torch.zeros(2))
    grads = []
    for worst in (WORST, torch.tensor([[20, 21, 22, 23, 24, EOS], [EOS, PAD, PAD, PAD, PAD, PAD]])):
        tiny_lm.zero_grad()
        losses_on(bon, tiny_lm, worst).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_lm.parameters()]))
    tiny_lm.zero_grad()
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_negative_term_is_beta_times_the_clamped_token_mean_and_lowers_log_pi_worst(tiny_lm):
    neg = load_script("best_of_n_neg")
    logps, lengths = torch.tensor([-2.0, -12.0, -30.0, -1.0], requires_grad=True), torch.tensor([2, 3, 5, 0])
    out = neg.negative_loss(logps, lengths, 0.5, -4.0)  # token means -1, -4, -6 (below the floor), -1 (length clamped to 1)
    torch.testing.assert_close(out, torch.tensor([-0.5, -2.0, -2.0, -0.5]))
    out.sum().backward()  # d/dlogp = beta / |y| above the floor, exactly 0 below it: the unbounded direction is cut off
    torch.testing.assert_close(logps.grad, torch.tensor([0.25, 0.5 / 3, 0.0, 0.5]))
    # on a model: best_of_n_neg's loss is best_of_n's plus the term, and a gradient step on it lowers log pi(y_worst)
    bon = load_script("best_of_n")
    with torch.no_grad():
        worst_before = token_mean_logps(tiny_lm, [[5, 6], [7, 8, 9]], [[15, EOS], [16, 17]])
        torch.testing.assert_close(losses_on(neg, tiny_lm, WORST, 0.3, -100.0), losses_on(bon, tiny_lm, WORST) + 0.3 * worst_before)
    model = type(tiny_lm)(tiny_lm.config)
    model.load_state_dict(tiny_lm.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, rejected_logps = neg.sequence_logprobs(model, T, Q, BEST, WORST)
    neg.negative_loss(rejected_logps, neg.response_mask(WORST, PAD, EOS).sum(1), 1.0, -100.0).mean().backward()
    opt.step()
    with torch.no_grad():
        worst_after = token_mean_logps(model, [[5, 6], [7, 8, 9]], [[15, EOS], [16, 17]])
    assert (worst_after < worst_before - 1e-3).all(), (worst_before, worst_after)


def test_rwr_weights_are_clipped_monotone_and_never_push_down():
    rwr_loss = load_script("rwr").rwr_loss
    g = torch.Generator().manual_seed(0)
    rewards = torch.sort(3 * torch.randn(4, 8, generator=g), dim=1).values
    logps, lengths = (-20 * torch.rand(4, 8, generator=g)).requires_grad_(), torch.randint(0, 12, (4, 8), generator=g)
    losses, weights = rwr_loss(logps, lengths, rewards, 0.7, 5.0)
    torch.testing.assert_close(weights, torch.exp(rewards / 0.7).clamp(max=5.0))
    torch.testing.assert_close(losses, -weights * logps / lengths.clamp(min=1))
    assert (weights.diff(dim=1) >= 0).all() and (weights > 0).all() and weights.max() == 5.0  # monotone in reward, clipped
    assert not weights.requires_grad  # the weights are data
    losses.sum().backward()
    assert (logps.grad <= 0).all()  # descent only ever raises log-probs: no negative gradient
    _, w = rwr_loss(torch.zeros(3), torch.ones(3), torch.tensor([1e4, 0.0, -1e4]), 1.0, 20.0)
    assert w.tolist() == [20.0, 1.0, 0.0]  # exp overflow is clipped, never inf or NaN


@pytest.mark.parametrize("script,task,extra", [("best_of_n", t, ["--offline"]) for t in SMOKE_TASKS] +  # (test_algos: every script)
                         [("best_of_n", t, []) for t in TASKS if t not in SMOKE_TASKS])
def test_script_runs_end_to_end(script, task, extra, tmp_path):
    smoke(script, task, tmp_path, KEYS[script], *extra)


def test_all_worse_pairs_the_best_with_every_worse_completion(tmp_path):
    _, rows = train("best_of_n_neg", tmp_path, "bandit_r1", "--all-worse", "--num-iterations", "2", "--batch-size", "16",
                    "--minibatch-size", "8", "--num-eval-prompts", "8")
    # 4 completions per prompt: 3 pairs per prompt unless some tie with the best (continuous rewards: rare)
    assert [r["train/pairs_kept"] for r in rows[1:]] == [3.0, 3.0]


def test_offline_data_come_from_one_pi_ref_collection(tmp_path):
    proxy = {}
    for mode, lr in (("offline", "1e-3"), ("offline", "1e-2"), ("online", "1e-3"), ("online", "1e-2")):
        (tmp_path / mode / lr).mkdir(parents=True)
        _, rows = train("best_of_n", tmp_path / mode / lr, "bandit_r1", *(["--offline"] if mode == "offline" else []), "--learning-rate", lr,
                        "--num-iterations", "6", "--eval-every", "6", "--num-eval-prompts", "8")
        proxy[mode, lr] = [r["objective/proxy_reward"] for r in rows[1:]]
        assert [r["samples"] for r in rows] == [64 * i for i in range(7)]  # B completions per iteration in both modes
    # the offline batches do not depend on the policy being trained; the on-policy ones do
    assert proxy["offline", "1e-3"] == proxy["offline", "1e-2"] and proxy["online", "1e-3"] != proxy["online", "1e-2"]


def test_rwr_weights_follow_the_standardised_rewards(tmp_path):
    _, rows = train("rwr", tmp_path, "bandit_r1", "--num-iterations", "2", "--batch-size", "16", "--minibatch-size", "8",
                    "--num-eval-prompts", "8", "--tau", "0.5", "--max-weight", "3")
    # per-prompt z-scores of C = 4 rewards lie in [-sqrt(3), sqrt(3)]: exp(z / 0.5) spans (0.03, 32), clipped at 3
    assert all(r["train/weight_max"] == 3.0 and 0 < r["train/weight_clipped_frac"] < 0.5 for r in rows[1:])
    (tmp_path / "b").mkdir()
    _, rows = train("rwr", tmp_path / "b", "bandit_r1", "--num-iterations", "2", "--batch-size", "16", "--minibatch-size", "8",
                    "--num-eval-prompts", "8")
    assert all(r["train/weight_max"] <= math.exp(math.sqrt(3)) + 1e-4 and r["train/weight_clipped_frac"] == 0 for r in rows[1:])


def test_negative_gradient_beats_best_of_n_on_bandit_r1(tmp_path):
    # claim 3, on-policy, same seeds and budget: 12 iterations at lr 3e-3 (both scripts' tuned bandit_r1 rate). Measured
    # eval/gold_reward at iteration 12, seeds 1/2/3: best_of_n 0.770/0.748/0.693, best_of_n_neg 0.839/0.801/0.786 (both
    # reach ~1.0 by iteration 30, so the gap is one of speed). Its size is the world's (issue 30): world 1 gave best_of_n
    # 0.773/0.791/0.789, best_of_n_neg 0.865/0.808/0.764, one seed against, a mean gap of 0.028 (world 0: 0.072), so the
    # test asserts the mean's sign; a negative term with the wrong sign pushes the worst responses up and loses it
    gold = {}
    for script in ("best_of_n", "best_of_n_neg"):
        for seed in ("1", "2", "3"):
            (tmp_path / script / seed).mkdir(parents=True)
            _, rows = train(script, tmp_path / script / seed, "bandit_r1", "--learning-rate", "3e-3", "--num-iterations", "12",
                            "--eval-every", "12", "--seed", seed)
            gold[script, seed] = rows[-1]["eval/gold_reward"]
    gaps = [gold["best_of_n_neg", seed] - gold["best_of_n", seed] for seed in ("1", "2", "3")]
    assert min(gold.values()) > 0.5 and sum(gaps) / 3 > 0, gold


def test_best_of_n_on_policy_beats_offline_on_bandit_r1(tmp_path):
    # claim 1: reward peak where pi_ref is unlikely. Measured after 20 iterations at lr 3e-3 (seed 1): on-policy 1.000,
    # offline 0.078; pi_ref's best of 4 rarely comes near token 70, so the offline data cannot lead there
    gold = {}
    for mode in ("online", "offline"):
        (tmp_path / mode).mkdir()
        _, rows = train("best_of_n", tmp_path / mode, "bandit_r1", "--learning-rate", "3e-3", "--num-iterations", "20", "--eval-every", "20",
                        *(["--offline"] if mode == "offline" else []))
        gold[mode] = rows[-1]["eval/gold_reward"]
    assert gold["online"] > 0.9 and gold["offline"] < 0.3, gold


def test_rwr_learns_min_length(tmp_path):
    # a wrong weight or mask moves towards longer answers or nowhere (issue 30: this read "gold > -5 after 10 iterations",
    # true on the world it was measured on, -6.3 on another machine's: 0.73 of the room)
    _, rows = train("rwr", tmp_path, "min_length", "--num-iterations", "10")
    gold_0, gained = room(rows, "min_length")
    assert gained > 0.5 and rows[-1]["eval/eos_rate"] > 0.9, (gold_0, rows[-1])


def test_same_seed_same_metrics(tmp_path):
    runs = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _, rows = train("best_of_n_neg", tmp_path / sub, "min_length", "--num-iterations", "3", "--eval-every", "1", "--all-worse",
                        "--batch-size", "16", "--minibatch-size", "8", "--num-eval-prompts", "16")
        runs.append([{k: v for k, v in r.items() if k != "time_s"} for r in rows])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("script,args,message", [
    ("best_of_n", ["--num-completions", "1"], "--num-completions must be >= 2"),
    ("best_of_n_neg", ["--batch-size", "64", "--num-completions", "3"], "--batch-size / --num-completions"),
    ("rwr", ["--tau", "0"], "--tau and --max-weight must be > 0"),
    ("rwr", ["--max-weight", "-1"], "--tau and --max-weight must be > 0"),
    ("rwr", ["--batch-size", "10", "--minibatch-size", "4"], "--batch-size / --minibatch-size: 10 is not divisible by 4"),
])
def test_bad_arguments_give_one_line(script, args, message, tmp_path):
    out = run(script, tmp_path, *args)
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()  # raised before anything loads or is written


@pytest.mark.parametrize("script", list(KEYS))
def test_all_tied_batch_is_a_logged_skip(script, tmp_path):
    _, rows = train(script, tmp_path, "bandit_r1", "--num-iterations", "2", "--batch-size", "8", "--minibatch-size", "4",
                    "--reward-gap-threshold", "1e9", "--num-eval-prompts", "8")
    assert [r["train/pairs_kept"] for r in rows[1:3]] == [0.0, 0.0]
    assert all(math.isfinite(v) for r in rows for v in r.values()) and "eval/gold_reward" in rows[2]
