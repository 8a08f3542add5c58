"""The policy-gradient family (reinforce.py, ppo.py, grpo.py): loss math, end to end, learning, determinism."""

import json
import math

import pytest
import torch
from conftest import EOS, PAD, SMOKE_TASKS, TASKS, load_script, room, smoke, train

KEYS = {
    "reinforce": ["train/advantage_mean", "train/advantage_std", "objective/kl", "objective/proxy_reward", "logps/policy"],
    "grpo": ["train/advantage_mean", "train/advantage_std", "train/clipfrac", "train/kl", "objective/kl", "objective/proxy_reward"],
    "ppo": ["train/approx_kl", "train/clipfrac", "train/value_loss", "train/kl_coef", "train/policy_loss", "objective/kl",
            "objective/proxy_reward"],
}


# ---------------------------------------------------------------- REINFORCE


def test_rloo_advantages_by_hand_and_exactly_zero_on_ties():
    rloo_advantages = load_script("reinforce").rloo_advantages
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.1, 0.1, 0.1], [-3.0, 5.0, 0.7]])
    adv = rloo_advantages(rewards)
    # r_i minus the mean of the other two
    torch.testing.assert_close(adv[0], torch.tensor([1 - 3.0, 2 - 2.5, 4 - 1.5]))
    torch.testing.assert_close(adv[2], torch.tensor([-3 - 2.85, 5 - (-1.15), 0.7 - 1.0]))
    assert torch.equal(adv[1], torch.zeros(3))  # exactly, not approximately (0.1 is not a binary fraction)
    torch.testing.assert_close(rloo_advantages(torch.tensor([[2.0, 7.0]])), torch.tensor([[-5.0, 5.0]]))  # C = 2: r_i - r_j


def test_reinforce_loss_by_hand_and_no_gradient_when_rewards_tie(tiny_lm):
    reinforce = load_script("reinforce")
    logps = torch.tensor([-3.0, -1.5, -7.0], requires_grad=True)
    adv = torch.tensor([2.0, -0.5, 0.0])
    losses = reinforce.reinforce_loss(logps, adv)
    torch.testing.assert_close(losses, torch.tensor([6.0, -0.75, 0.0]), rtol=0, atol=0)
    losses.sum().backward()
    torch.testing.assert_close(logps.grad, -adv)  # descent raises log pi(y) where A > 0, lowers it where A < 0

    from common import response_logprobs

    queries = torch.tensor([[PAD, 5, 6], [7, 8, 9]]).repeat_interleave(2, 0)
    responses = torch.tensor([[10, EOS, PAD], [11, 12, EOS], [13, EOS, PAD], [14, 15, 16]])
    policy_logps, _ = response_logprobs(tiny_lm, queries, responses, PAD, EOS)
    advantages = reinforce.rloo_advantages(torch.full((2, 2), 0.3)).flatten()
    assert torch.equal(advantages, torch.zeros(4))
    tiny_lm.zero_grad()
    reinforce.reinforce_loss(policy_logps.sum(1), advantages).mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny_lm.parameters())


# ---------------------------------------------------------------- GRPO


def test_group_advantages_normalise_per_prompt_and_ties_give_zero():
    group_advantages = load_script("grpo").group_advantages
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.1, 0.1, 0.1], [10.0, 10.0, 13.0]])
    adv = group_advantages(rewards, "grpo")
    for row, r in zip(adv, rewards):
        if r.std() > 0:
            torch.testing.assert_close(row, (r - r.mean()) / (r.std() + 1e-4))  # unbiased std, per prompt
    torch.testing.assert_close(adv[0], torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7.0) + 1e-4))
    assert torch.equal(adv[1], torch.zeros(3)) and torch.isfinite(adv).all()  # zero variance: zero advantage, no NaN
    # per prompt: the two groups share a shape, so their normalised advantages match despite different scales
    torch.testing.assert_close(adv[2], group_advantages(torch.tensor([[0.0, 0.0, 3.0]]), "grpo")[0])
    dr = group_advantages(rewards, "dr_grpo")  # Dr. GRPO: centred, not scaled
    torch.testing.assert_close(dr, torch.tensor([[-2.0, -1.0, 3.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 2.0]]))
    assert torch.equal(dr[1], torch.zeros(3))


def test_grpo_and_dr_grpo_differ_exactly_by_their_normalisation():
    grpo_loss = load_script("grpo").grpo_loss
    # two sequences of lengths 1 and 3 in a width-4 batch; ratio 1 (new = old), no KL term
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    old = torch.tensor([[-1.0, 0, 0, 0], [-2.0, -0.5, -1.0, 0]])
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, clipfrac, k3 = grpo_loss(new, old, old, adv, mask, 0.2, 0.0, "grpo")
    # grpo: -(1/N) sum_i (1/|y_i|) sum_t A_i  = -(1 + (-1)) / 2
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and clipfrac.item() == 0.0 and k3.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]]))  # -A_i / (N |y_i|)
    new.grad = None
    loss, _, _ = grpo_loss(new, old, old, adv, mask, 0.2, 0.0, "dr_grpo", max_tokens=8)
    # dr_grpo: -(1 * 1 + 3 * (-1)) / (N * max_tokens) = 2 / 16: every token weighs the same, whatever its sequence's length
    assert loss.item() == pytest.approx(2 / 16)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-1 / 16, 0, 0, 0], [1 / 16, 1 / 16, 1 / 16, 0]]))
    assert grpo_loss(new, old, old, adv, mask, 0.2, 0.0, "dr_grpo")[0].item() == pytest.approx(2 / 8)  # default: the mask's width


def test_grpo_loss_clips_the_ratio_and_adds_k3():
    grpo_loss = load_script("grpo").grpo_loss
    mask = torch.tensor([[True, True, True, True, False]])
    old = torch.zeros(1, 5)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0, 1.0]])
    new = ratios.log().requires_grad_(True)
    for a, clipped_tokens in ((1.0, [0]), (-1.0, [1])):  # A > 0 clips above 1 + eps, A < 0 below 1 - eps
        new.grad = None
        loss, clipfrac, _ = grpo_loss(new, old, old, torch.tensor([a]), mask, 0.2, 0.0, "grpo")
        surrogate = [min(r * a, min(max(r, 0.8), 1.2) * a) for r in ratios[0, :4].tolist()]
        assert loss.item() == pytest.approx(-sum(surrogate) / 4) and clipfrac.item() == pytest.approx(0.25)
        loss.backward()
        assert [t for t in range(4) if new.grad[0, t] == 0] == clipped_tokens and new.grad[0, 4] == 0
    ref = torch.tensor([[-0.3, 0.2, 0.0, 1.0, 5.0]])  # k3 = exp(d) - d - 1 with d = ref - new, over the 4 real tokens
    d = ref[0, :4] - new[0, :4].detach()
    expected_k3 = (d.exp() - d - 1).mean().item()
    loss0, _, _ = grpo_loss(new, old, ref, torch.tensor([0.0]), mask, 0.2, 0.0, "grpo")
    loss1, _, k3 = grpo_loss(new, old, ref, torch.tensor([0.0]), mask, 0.2, 0.5, "grpo")
    assert k3.item() == pytest.approx(expected_k3, rel=1e-6) and (loss1 - loss0).item() == pytest.approx(0.5 * expected_k3, rel=1e-5)


# ---------------------------------------------------------------- PPO


def gae_reference(rewards, values, length, gamma, lam):
    """GAE of one sequence by its definition: A_t = sum_l (gamma lam)^l delta_{t+l}, V = 0 after the end."""
    v = values[:length] + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0)])
def test_compute_gae_matches_its_definition_on_padded_rows(gamma, lam):
    compute_gae = load_script("ppo").compute_gae
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 1, 4, 6, 2]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        torch.testing.assert_close(adv[b, :n], torch.tensor(ref_adv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[b, :n], torch.tensor(ref_ret), rtol=1e-5, atol=1e-5)
        assert not adv[b, n:].any() and not ret[b, n:].any()  # whatever the pads held
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: the return is the sum of the rewards to go
        torch.testing.assert_close(ret[0], rewards[0].flip(0).cumsum(0).flip(0))


def test_ppo_losses_unclipped_at_ratio_one_and_clipped_beyond_eps():
    ppo_losses = load_script("ppo").ppo_losses
    mask = torch.tensor([[True, True, True, True, False]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -2.0, 7.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, 0.0]])
    values = torch.zeros(1, 5)
    # ratio 1: the plain surrogate -mean(A) over the 4 real tokens, nothing clipped, approx_kl 0
    pg, _, clipfrac, approx_kl = ppo_losses(old.clone(), old, adv, values, values, values, mask, 0.2)
    assert pg.item() == pytest.approx(-0.0) and clipfrac.item() == 0.0 and approx_kl.item() == pytest.approx(0.0, abs=1e-7)
    adv2 = torch.tensor([[1.0, 3.0, 2.0, 5.0, 7.0]])
    assert ppo_losses(old.clone(), old, adv2, values, values, values, mask, 0.2)[0].item() == pytest.approx(-11 / 4)
    # just past 1 + eps with A > 0 and 1 - eps with A < 0: clipped (no gradient); just inside, or the other sign: not
    ratios = torch.tensor([[1.2 + 1e-3, 0.8 - 1e-3, 1.2 - 1e-3, 0.8 - 1e-3, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0]])
    new = (old + ratios.log()).requires_grad_(True)
    pg, _, clipfrac, approx_kl = ppo_losses(new, old, adv, values, values, values, mask, 0.2)
    r = ratios[0].tolist()
    assert pg.item() == pytest.approx(-(1.2 * 1 + 0.8 * -1 + r[2] * 1 + r[3] * 1) / 4, rel=1e-5)
    assert clipfrac.item() == pytest.approx(2 / 4)
    assert approx_kl.item() == pytest.approx(sum(x - 1 - math.log(x) for x in r[:4]) / 4, rel=1e-4)
    pg.backward()
    assert new.grad[0, :2].tolist() == [0.0, 0.0] and (new.grad[0, 2:4] != 0).all() and new.grad[0, 4] == 0


def test_ppo_value_loss_is_clipped_around_the_old_value():
    ppo_losses = load_script("ppo").ppo_losses
    mask = torch.tensor([[True, True, False]])
    logps, adv = torch.zeros(1, 3), torch.zeros(1, 3)
    old_values, returns = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 9.0]])
    new_values = torch.tensor([[0.5, 0.9, 4.0]], requires_grad=True)
    _, vf, _, _ = ppo_losses(logps, logps, adv, new_values, old_values, returns, mask, 0.2)
    # token 0: max((0.5 - 1)^2, (0.2 - 1)^2) = 0.64 (clipped, no gradient); token 1: max(0.81, 0.81); the pad is ignored
    assert vf.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    vf.backward()
    assert new_values.grad[0, 0] == 0 and new_values.grad[0, 2] == 0 and new_values.grad[0, 1] == pytest.approx(0.5 * 2 * 0.9 / 2)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("script,task", [("ppo", t) for t in TASKS if t not in SMOKE_TASKS])  # (test_algos: every script)
def test_script_runs_end_to_end(script, task, tmp_path):
    smoke(script, task, tmp_path, KEYS[script])


def test_reinforce_moving_average_baseline_runs(tmp_path):
    _, rows = smoke("reinforce", "bandit_r1", tmp_path, KEYS["reinforce"], "--baseline", "moving_average", "--num-completions", "1",
                    "--kl-coef", "0.05")
    assert rows[1]["train/advantage_mean"] == pytest.approx(0.0, abs=1e-6)  # the first batch is its own baseline
    assert rows[2]["train/advantage_mean"] != pytest.approx(0.0, abs=1e-6)  # then earlier batches' average


def test_ppo_runs_on_a_local_model_and_prompts_with_its_reward_model_as_critic(local_pythia, tmp_path, monkeypatch):
    model_dir, prompts, cache = local_pythia
    monkeypatch.setenv("CLEANPREF_CACHE", str(cache))
    args, rows = train("ppo", tmp_path, "skew_length", "--model", str(model_dir), "--prompts", str(prompts), "--num-iterations", "2",
                       "--batch-size", "8", "--minibatch-size", "4", "--num-eval-prompts", "4", "--save-model")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[0]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-3) and {"train/value_loss", "train/approx_kl"} <= set(rows[-1])
    saved = next((tmp_path / "runs").iterdir()) / "model"
    assert json.loads((saved / "config.json").read_text())["model_type"] == "gpt_neox"


def test_ppo_value_model_starts_from_the_reward_model_or_from_pi_ref():
    ppo = load_script("ppo")
    from tasks import make_task

    task = make_task("min_length")  # the critic is the proxy reward model: at the last token it reads the proxy score
    critic = ppo.load_value_model(task, torch.device("cpu"))
    queries = torch.tensor([task.eval_prompts[0], task.eval_prompts[0]])
    responses = torch.tensor([[task.eos_token_id, task.pad_token_id], [task.eval_prompts[1][0], task.eos_token_id]])
    with torch.no_grad():
        values = ppo.token_values(critic, queries, torch.cat([responses, torch.full((2, 1), task.pad_token_id)], 1), task.pad_token_id)
    # V at the state after the whole response (incl. EOS) is the reward model's score of that response
    torch.testing.assert_close(values[[0, 1], [1, 2]], task.proxy_reward(queries, responses), rtol=1e-4, atol=1e-4)
    bandit = make_task("bandit_r1")
    critic = ppo.load_value_model(bandit, torch.device("cpu"))
    assert bandit.reward_model_path is None and type(critic).__name__ == "LlamaForSequenceClassification"
    backbone = dict(critic.base_model.named_parameters())
    assert all(torch.equal(backbone[k.removeprefix("model.")], v) for k, v in bandit.load_policy().state_dict().items() if k.startswith("model."))


def test_all_tied_batches_are_logged_skips(tmp_path, monkeypatch):
    """A constant proxy reward ties every group: zero advantages, no update, every row logged, no NaN."""
    import tasks

    def constant_reward_task(*a, **k):
        task = tasks.make_task(*a, **k)
        task.proxy_reward = lambda queries, responses: torch.full((queries.shape[0],), 0.3)
        return task

    monkeypatch.chdir(tmp_path)
    for script in ("reinforce", "grpo"):
        module = load_script(script)
        monkeypatch.setattr(module, "make_task", constant_reward_task)
        module.main(module.Args(task="bandit_r1", num_iterations=2, eval_every=1, batch_size=8, minibatch_size=4, num_eval_prompts=8))
        (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if f"__{script}__" in d.name]
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert [r["iteration"] for r in rows] == [0, 1, 2] and all(math.isfinite(v) for r in rows for v in r.values())
        assert all(r["train/advantage_std"] == 0.0 and "train/loss" not in r for r in rows[1:])
        assert {k: v for k, v in rows[2].items() if k.startswith("eval/")} == {k: v for k, v in rows[0].items() if k.startswith("eval/")}


# measured (seed 1, 2-core CPU, the tuned TASK_DEFAULTS): eval/gold_reward at iteration 0 -> at the end of the run, and
# the fraction of the room gained (conftest.room). A loss with the wrong sign or a wrong mask moves away from the peak
# (bandit: towards token 16, reward ~0; min_length: longer answers) or not at all; the thresholds hold on other worlds.
LEARNING = [
    ("reinforce", "bandit_r1", 40, 0.7),  # 0.036 -> 0.994 (KL 52): 0.99 of the room
    ("grpo", "bandit_r1", 40, 0.7),  # 0.036 -> 0.999 (KL 52): 1.0
    ("ppo", "bandit_r1", 40, 0.7),  # 0.036 -> 0.961 (KL 35): 0.96; the per-token KL penalty holds it below the pure peak's KL
    ("reinforce", "min_length", 20, 0.6),  # -24.5 -> -0.17 at lr 3e-4: 0.99 (issue 27; the tuned 3e-3 gave -0.016, and collapsed on seed 3)
    ("grpo", "min_length", 20, 0.4),  # lr 1e-3 (issue 30): world 0 -23.2 -> -5.1: 0.78; world 1 -24.9 -> -9.3: 0.63
    ("ppo", "min_length", 20, 0.6),  # lr 1e-3 (issue 30): world 0 -23.2 -> -0.04, world 1 -24.9 -> -0.06: 1.0 on both
]


@pytest.mark.parametrize("script,task,iterations,threshold", LEARNING)
def test_learns(script, task, iterations, threshold, tmp_path):
    _, rows = train(script, tmp_path, task, "--num-iterations", str(iterations), "--eval-every", str(iterations))
    gold_0, gained = room(rows, task)
    assert gained > threshold, (gold_0, rows[-1]["eval/gold_reward"], gained)
    assert rows[-1]["eval/eos_rate"] > 0.9 and math.isfinite(rows[-1]["eval/kl_ref"])


def test_ppo_tolerates_sample_reuse_on_bandit_r1(tmp_path):
    """Claim 6: PPO with T = 4 passes over each batch does not collapse, and its KL penalty still holds it below the
    KL of the pure peak (52, where REINFORCE ends). Measured at 40 iterations, seed 1, the tuned defaults (lr 1e-2,
    init_kl_coef 0.0063): T = 4 gold 0.964 at KL 37.1 (T = 1: 0.961 at KL 34.8)."""
    _, rows = train("ppo", tmp_path, "bandit_r1", "--num-iterations", "40", "--eval-every", "40", "--update-epochs", "4")
    assert rows[-1]["eval/gold_reward"] > 0.8 and rows[-1]["eval/kl_ref"] < 45, rows[-1]
    assert max(r["train/clipfrac"] for r in rows[1:]) > 0  # the clip is active once batches are reused


@pytest.mark.parametrize("script,args,message", [
    ("reinforce", ["--num-completions", "1"], "--num-completions must be >= 2 for --baseline rloo"),
    ("grpo", ["--num-completions", "1"], "--num-completions must be >= 2"),
    ("grpo", ["--cliprange", "0"], "--cliprange > 0"),
    ("ppo", ["--cliprange", "-0.1"], "--cliprange, --kl-horizon and --target-kl must be > 0"),
    ("ppo", ["--gamma", "1.5"], "--gamma and --lam must lie in [0, 1]"),
    ("ppo", ["--lam", "-0.1"], "--gamma and --lam must lie in [0, 1]"),
    ("ppo", ["--batch-size", "64", "--minibatch-size", "24"], "--batch-size / --minibatch-size: 64 is not divisible by 24"),
    ("grpo", ["--batch-size", "64", "--num-completions", "3"], "--batch-size / --num-completions"),
])
def test_bad_arguments_give_one_line(script, args, message, tmp_path):
    from conftest import run

    out = run(script, tmp_path, *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_ppo_same_seed_same_metrics(tmp_path):
    runs = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _, rows = train("ppo", tmp_path / sub, "min_length", "--num-iterations", "3", "--eval-every", "1", "--batch-size", "16",
                        "--minibatch-size", "8", "--update-epochs", "2", "--num-eval-prompts", "16")
        runs.append([{k: v for k, v in r.items() if k != "time_s"} for r in rows])
    assert runs[0] == runs[1]
