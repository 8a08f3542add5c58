"""The contrastive family: ipo.py, online_ipo.py, hypo.py. Loss math, the KL estimator, every script end to end, learning,
determinism, bad input."""

import json
import math

import pytest
import torch
from conftest import SMOKE_TASKS, TASKS, learns_without_collapsing, load_script, room, run, smoke, train

DPO_KEYS = ["logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"]
HYPO_KEYS = DPO_KEYS + ["train/kl_loss", "train/kl_estimate", "train/online_samples"]


# ---------------------------------------------------------------- IPO loss


@pytest.mark.parametrize("script", ["ipo", "online_ipo"])
def test_ipo_loss_is_the_squared_target_at_the_reference_and_matches_the_formula(script):
    ipo_loss = load_script(script).ipo_loss
    g = torch.Generator().manual_seed(0)
    pc, pr = -10 * torch.rand(8, generator=g), -10 * torch.rand(8, generator=g)
    losses, cr, rj = ipo_loss(pc, pr, pc, pr, 0.1)
    torch.testing.assert_close(losses, torch.full((8,), (1 / (2 * 0.1)) ** 2))  # h_w = h_l = 0: (1 / (2 tau))^2 = 25
    assert (cr == 0).all() and (rj == 0).all()
    rc, rr = -10 * torch.rand(8, generator=g), -10 * torch.rand(8, generator=g)
    losses, cr, rj = ipo_loss(pc, pr, rc, rr, 0.3)
    expected = torch.tensor([((a - c) - (b - d) - 1 / 0.6) ** 2 for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())])
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cr, 0.3 * (pc - rc))  # the logged rewards are tau * h
    torch.testing.assert_close(rj, 0.3 * (pr - rr))


def test_ipo_gradient_pulls_the_margin_to_its_target_from_both_sides():
    ipo_loss, dpo_loss = load_script("ipo").ipo_loss, load_script("dpo").dpo_loss
    tau = 0.25  # target margin h_w - h_l = 1 / (2 tau) = 2
    for margin in (0.5, 2.0, 6.0):  # below, at and above the target
        pc, pr = torch.tensor([margin - 3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
        losses, _, _ = ipo_loss(pc, pr, torch.zeros(1), torch.zeros(1), tau)
        losses.sum().backward()
        # d/d log pi(y_w) of (m - 2)^2 is 2 (m - 2): descent raises a margin below 2 and lowers one above it
        assert pc.grad.item() == pytest.approx(2 * (margin - 2.0)) and pr.grad.item() == pytest.approx(-2 * (margin - 2.0))
        pc.grad = None
        dpo, _, _ = dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), 0.1)
        dpo.sum().backward()
        assert pc.grad.item() < 0  # DPO, by contrast, pushes every margin up, 6 included


# ---------------------------------------------------------------- HyPO's KL estimator


def _categorical(seed=0, n=5):
    """A policy small enough to enumerate: softmax over n logits, one-token responses; and a fixed reference."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def _surrogate_grad(hypo_kl_loss, theta, ref_logits, prompts, k, generator):
    """Gradient in theta of the mean surrogate over `prompts` groups of k samples from softmax(theta)."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)
    y = torch.multinomial(logp.exp().detach(), prompts * k, replacement=True, generator=generator)
    losses, log_ratios = hypo_kl_loss(logp[y], torch.log_softmax(ref_logits, 0)[y], k)
    (grad,) = torch.autograd.grad(losses.mean(), theta)
    return grad, losses.detach(), log_ratios, y


def test_hypo_kl_loss_gradient_is_unbiased_for_the_exact_reverse_kl():
    hypo_kl_loss = load_script("hypo").hypo_kl_loss
    theta, ref_logits = _categorical()
    exact_theta = theta.clone().requires_grad_(True)
    logp, ref_logp = torch.log_softmax(exact_theta, 0), torch.log_softmax(ref_logits, 0)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    (exact_grad,) = torch.autograd.grad(exact_kl, exact_theta)
    g = torch.Generator().manual_seed(1)
    for k in (2, 4):
        # the mean over many sampled batches of the surrogate's gradient (one big batch: each group's baseline is its own)
        grads = torch.stack([_surrogate_grad(hypo_kl_loss, theta, ref_logits, 64, k, g)[0] for _ in range(2000)])
        mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
        assert ((mean - exact_grad).abs() < 4 * stderr + 1e-4).all(), (k, mean, exact_grad, stderr)
        assert exact_grad.abs().max() > 20 * stderr.max()  # the tolerance is far tighter than the gradient itself
        # and its value is the Monte-Carlo estimate of the KL itself
        _, losses, log_ratios, _ = _surrogate_grad(hypo_kl_loss, theta, ref_logits, 20000, k, g)
        tolerance = 4 * losses.std().item() / math.sqrt(losses.numel())
        assert torch.equal(losses, log_ratios) and losses.mean().item() == pytest.approx(exact_kl.item(), abs=tolerance)


def test_hypo_kl_loss_leave_one_out_baseline_lowers_the_variance():
    # a policy that has drifted where pi_ref is unlikely (HyPO's case): its samples share a large log-ratio (KL 2.5), which
    # plain REINFORCE multiplies into every sample's score and the leave-one-out baseline removes. (Near pi_ref, on this toy,
    # the baseline's own noise can outweigh that: it is not a free win everywhere.)
    hypo_kl_loss = load_script("hypo").hypo_kl_loss
    theta, ref_logits = torch.tensor([3.0, 3, -3, -3, -3]), torch.tensor([-1.0, -1, 1, 1, 1])
    g = torch.Generator().manual_seed(3)
    for k in (2, 4):
        loo, plain = [], []
        for _ in range(3000):
            grad, _, log_ratios, y = _surrogate_grad(hypo_kl_loss, theta, ref_logits, 8, k, g)
            loo.append(grad)
            # plain REINFORCE, no baseline: r_i * grad log pi(y_i) = r_i * (onehot(y_i) - pi)
            plain.append((log_ratios[:, None] * (torch.nn.functional.one_hot(y, 5).float() - torch.softmax(theta, 0))).mean(0))
        loo, plain = torch.stack(loo), torch.stack(plain)
        torch.testing.assert_close(loo.mean(0), plain.mean(0), atol=0.01, rtol=0)  # the same expected gradient
        # measured (seed 3, 3000 repeats of 8 prompts): total variance 0.031 vs 0.202 (k = 2), 0.013 vs 0.098 (k = 4)
        assert loo.var(0).sum() < 0.3 * plain.var(0).sum(), (k, loo.var(0).sum(), plain.var(0).sum())


def test_hypo_kl_loss_is_zero_when_the_policy_is_the_reference():
    hypo_kl_loss = load_script("hypo").hypo_kl_loss
    theta, _ = _categorical()
    grad, losses, _, _ = _surrogate_grad(hypo_kl_loss, theta, theta, 512, 2, torch.Generator().manual_seed(0))
    assert (losses == 0).all() and (grad == 0).all()


def test_hypo_kl_loss_by_hand():
    hypo_kl_loss = load_script("hypo").hypo_kl_loss
    logps = torch.tensor([-1.0, -2.0, -4.0, -3.0, -5.0, -6.0], requires_grad=True)  # 2 prompts x 3 samples
    ref = torch.tensor([-2.0, -2.0, -2.0, -3.0, -3.0, -3.0])
    losses, log_ratios = hypo_kl_loss(logps, ref, 3)
    r = [1.0, 0.0, -2.0, 0.0, -2.0, -3.0]
    torch.testing.assert_close(log_ratios, torch.tensor(r))
    torch.testing.assert_close(losses.detach(), torch.tensor(r))  # the value: each sample's log-ratio
    losses.sum().backward()
    # advantage = r_i - mean of the other two of its prompt
    expected = [1 - (0 - 2) / 2, 0 - (1 - 2) / 2, -2 - (1 + 0) / 2, 0 - (-2 - 3) / 2, -2 - (0 - 3) / 2, -3 - (0 - 2) / 2]
    torch.testing.assert_close(logps.grad, torch.tensor(expected))


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("script,task", [("hypo", t) for t in TASKS if t not in SMOKE_TASKS])  # (test_algos: every script)
def test_script_runs_end_to_end(script, task, tmp_path):
    _, rows = smoke(script, task, tmp_path, HYPO_KEYS if script == "hypo" else DPO_KEYS)
    if script == "hypo":  # k = 2 samples for each of the B = 8 offline prompts per iteration; `samples` counts them and 2 per pair
        assert [r["train/online_samples"] for r in rows[1:]] == [16, 32] and rows[-1]["samples"] == 2 * (16 + 16)


def test_hypo_runs_on_a_local_model_and_prompts(local_pythia, tmp_path, monkeypatch):
    model_dir, prompts, cache = local_pythia
    monkeypatch.setenv("CLEANPREF_CACHE", str(cache))
    args, rows = train("hypo", tmp_path, "skew_length", "--model", str(model_dir), "--prompts", str(prompts), "--num-iterations", "2",
                       "--batch-size", "8", "--minibatch-size", "4", "--num-eval-prompts", "4", "--save-model")
    assert args["model"] == str(model_dir) and [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values()) and rows[0]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-3)
    saved = next((tmp_path / "runs").iterdir()) / "model"
    assert json.loads((saved / "config.json").read_text())["model_type"] == "gpt_neox"


def test_hypo_without_its_kl_term_is_dpo(tmp_path):
    # --kl-coef 0 leaves exactly dpo.py's updates: the online sampling has its own generator and adds a zero gradient
    # (at one learning rate: the two scripts' tuned defaults differ)
    runs = {}
    for script in ("dpo", "hypo"):
        (tmp_path / script).mkdir()
        _, runs[script] = train(script, tmp_path / script, "bandit_r1", "--num-iterations", "3", "--eval-every", "1", "--batch-size", "16",
                                "--minibatch-size", "8", "--num-eval-prompts", "16", "--learning-rate", "1e-3",
                                *(["--kl-coef", "0"] if script == "hypo" else []))
    for a, b in zip(runs["dpo"], runs["hypo"]):  # `samples` aside: hypo also counts its online samples
        skip = ("time_s", "samples")
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k in a and k not in skip}
    assert runs["hypo"][-1]["train/kl_loss"] == 0 and runs["hypo"][-1]["train/online_samples"] == 3 * 16 * 2  # it did sample


def test_same_seed_same_metrics(tmp_path):
    runs = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _, rows = train("hypo", tmp_path / sub, "min_length", "--num-iterations", "2", "--eval-every", "1", "--batch-size", "16",
                        "--minibatch-size", "8", "--num-eval-prompts", "16")
        runs.append([{k: v for k, v in r.items() if k != "time_s"} for r in rows])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- learning (thresholds from measured runs)


def _evals(rows):
    return [r for r in rows if "eval/gold_reward" in r]


@pytest.mark.parametrize("script, lr", [("ipo", []), ("online_ipo", ["--learning-rate", "1e-3"])])
def test_ipo_learns_bandit_r1_and_its_margin_settles_at_the_target(script, lr, tmp_path):
    # online_ipo at a rate below its tuned 3e-2, which makes pi_theta deterministic (every sampled pair a tie, no margin logged)
    _, rows = train(script, tmp_path, "bandit_r1", "--num-iterations", "30", *lr)
    # measured (seed 1, 30 iterations): gold 0.04 -> 0.92 (ipo), 0.04 -> 0.88 (online_ipo); a flipped sign or a
    # missing target term moves the gold reward down or nowhere
    assert room(rows, "bandit_r1")[1] > 0.5
    # IPO regresses the margin onto 1 / (2 tau): the logged margin tau * (h_w - h_l) heads for 0.5 and is not pushed past it, as
    # DPO's would be (measured over the last 12 iterations: 0.20-0.37 ipo, 0.20-0.35 online_ipo)
    assert 0.05 < rows[-1]["rewards/margins"] < 0.55


def test_online_ipo_learns_skew_length_without_collapsing(tmp_path):
    # issue 27: at the rate tuned before (1e-3) 2 of 3 seeds stopped ending their responses for a while (EOS rate 0).
    # Measured (seed 1, the defaults, lr 3e-4): gold -24.5 at iteration 0, -2.0 after 20 (EOS 1.0, KL 12.7); seeds 1-5 cover
    # at least 91% of the room above pi_ref by iteration 20 and no evaluation of theirs in 60 iterations falls below EOS 0.91.
    # A broken loss stays near pi_ref's gold or gets longer; a collapse drops EOS below 0.5. The best evaluation is the one
    # asserted (issue 30): on world 1 seed 1 reaches -0.30 at iteration 10 (0.99 of the room), then wanders to -15.9 at
    # iteration 20 (KL 129, EOS 1.0) and comes back (-2.97 at 60); seeds 2 and 3 end at -3.0 and -3.7, none collapses
    _, rows = train("online_ipo", tmp_path, "skew_length", "--num-iterations", "20", "--eval-every", "2")
    learns_without_collapsing(rows, "skew_length", gained=0.6, peak=True)


def test_hypo_keeps_kl_below_dpo_on_min_length(tmp_path):
    # claim 9 in miniature: the same seed, learning rate and iterations; HyPO's online KL term holds pi near pi_ref where pi puts mass
    runs = {}
    for script in ("dpo", "hypo"):
        (tmp_path / script).mkdir()
        _, rows = train(script, tmp_path / script, "min_length", "--num-iterations", "15", "--eval-every", "5", "--learning-rate", "1e-3")
        runs[script] = (_evals(rows)[-1], room(rows, "min_length")[1])
    # measured (seed 1, lr 1e-3, 15 iterations) on two worlds: dpo leaves pi_ref's support (KL 449, no EOS, gold -64) while
    # hypo ends at KL 4.4 with 1.0 of the room; and dpo at KL 18.9 with 0.96 of the room, hypo at KL 4.4 with 0.71
    # (issue 30: HyPO's lower KL holds in both worlds; its reward at 15 iterations depends on the world)
    (hypo, hypo_gained), (dpo, _) = runs["hypo"], runs["dpo"]
    assert hypo["eval/kl_ref"] < 0.5 * dpo["eval/kl_ref"] and hypo_gained > 0.5, runs


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("script,args,message", [
    ("ipo", ["--tau", "0"], "--tau must be > 0"),
    ("online_ipo", ["--tau", "-1"], "--tau must be > 0"),
    ("ipo", ["--batch-size", "10", "--minibatch-size", "4"], "--batch-size / --minibatch-size: 10 is not divisible by 4"),
    ("online_ipo", ["--batch-size", "64", "--num-completions", "3"], "--batch-size / --num-completions"),
    ("hypo", ["--beta", "0"], "need --beta > 0"),
    ("hypo", ["--kl-coef", "-0.1"], "--kl-coef >= 0"),
    ("hypo", ["--num-online-samples", "1"], "--num-online-samples >= 2"),
    ("hypo", ["--batch-size", "12", "--minibatch-size", "8"], "--batch-size / --minibatch-size: 12 is not divisible by 8"),
])
def test_bad_arguments_give_one_line(script, args, message, tmp_path):
    out = run(script, tmp_path, *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()  # before any run directory or model
