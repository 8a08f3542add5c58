"""Beyond the paper (issue 28): simpo.py, orpo.py, kto.py, each a fork of one script (docs/fork.md). Loss math on
hand-computed cases, the gradient's sign, the length normalisation, KTO's examples and KL baseline, learning from
iteration 0, real data. Every script's smoke run comes from its STUDY declaration (test_algos.py); the 1-vs-2-process and
kill-and-resume checks are test_scale.py's, the knob errors test_errors.py's."""

import math

import pytest
import torch
from conftest import EOS, PAD, load_script, run, train

SCRIPTS = ["simpo", "orpo", "kto"]


class T:  # the task attributes sequence_logprobs reads
    pad_token_id, eos_token_id, temperature = PAD, EOS, 1.0


def _by_hand(model, pairs):
    """Per-token log-probs of each (prompt, response), one unpadded row at a time, the pad token banned (common.py's rule)."""
    out = []
    with torch.no_grad():
        for prompt, resp in pairs:
            logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : -1]
            logits[:, PAD] = float("-inf")
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0])
    return out


Q = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
CHOSEN = torch.tensor([[10, 11, EOS, PAD], [12, 13, 14, EOS]])
REJECTED = torch.tensor([[15, EOS], [16, EOS]])
PROMPTS, CHOSEN_ROWS, REJECTED_ROWS = [[5, 6], [7, 8, 9]], [[10, 11, EOS], [12, 13, 14, EOS]], [[15, EOS], [16, EOS]]


# ---------------------------------------------------------------- SimPO


def test_simpo_loss_by_hand():
    simpo_loss = load_script("simpo").simpo_loss
    a = -3 * torch.rand(8, generator=torch.Generator().manual_seed(0))
    losses, cr, rj = simpo_loss(a, a, 2.0, 0.0)  # equal rewards, no margin: -log sigmoid(0)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)))
    # beta 2, gamma 1: beta * (-1 - (-2)) - gamma = 1, so -log sigmoid(1) = log(1 + e^-1) = 0.31326
    losses, cr, rj = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6) == pytest.approx(0.313262, abs=1e-6)
    assert (cr.item(), rj.item()) == (-2.0, -4.0)  # rewards beta * mean log-prob
    # the margin shifts the loss: at avg_w - avg_l = gamma / beta the loss is log 2 again
    losses, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 1.0)
    assert losses.item() == pytest.approx(math.log(2))


def test_simpo_gradient_raises_chosen_and_lowers_rejected_and_rewards_are_detached():
    simpo_loss = load_script("simpo").simpo_loss
    aw, al = torch.tensor([-1.0, -3.0], requires_grad=True), torch.tensor([-2.0, -0.5], requires_grad=True)
    losses, cr, rj = simpo_loss(aw, al, 2.5, 1.4)
    losses.sum().backward()
    assert (aw.grad < 0).all() and (al.grad > 0).all()  # descent raises mean log pi(y_w), lowers mean log pi(y_l)
    assert not cr.requires_grad and not rj.requires_grad


def test_simpo_and_orpo_score_the_mean_over_response_tokens(tiny_lm):
    simpo, orpo = load_script("simpo"), load_script("orpo")
    chosen, rejected = _by_hand(tiny_lm, zip(PROMPTS, CHOSEN_ROWS)), _by_hand(tiny_lm, zip(PROMPTS, REJECTED_ROWS))
    aw, al = simpo.sequence_logprobs(tiny_lm, T, Q, CHOSEN, REJECTED)  # pads excluded, EOS counted
    torch.testing.assert_close(aw, torch.stack([t.mean() for t in chosen]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(al, torch.stack([t.mean() for t in rejected]), atol=1e-5, rtol=1e-5)
    sw, sl, nw, nl = orpo.sequence_logprobs(tiny_lm, T, Q, CHOSEN, REJECTED)  # sums and token counts
    assert nw.tolist() == [3, 4] and nl.tolist() == [2, 2]
    torch.testing.assert_close(sw / nw, aw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl, torch.stack([t.sum() for t in rejected]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ORPO


def test_orpo_loss_matches_a_float64_reference():
    orpo_loss = load_script("orpo").orpo_loss
    g = torch.Generator().manual_seed(0)
    aw, al = -4 * torch.rand(16, generator=g) - 1e-3, -4 * torch.rand(16, generator=g) - 1e-3
    nll = 5 * torch.rand(16, generator=g)
    losses, log_odds = orpo_loss(aw, al, nll, 0.3)
    ref_odds, ref_losses = [], []
    for w, l, n in zip(aw.double().tolist(), al.double().tolist(), nll.double().tolist()):
        o = (w - l) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(l)))  # log odds(y_w) - log odds(y_l)
        ref_odds.append(o)
        ref_losses.append(n - 0.3 * -math.log1p(math.exp(-o)))  # nll - lam * log sigmoid(o)
    torch.testing.assert_close(log_odds.double(), torch.tensor(ref_odds, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses.double(), torch.tensor(ref_losses, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_log1mexp_is_stable_at_both_ends():
    log1mexp = load_script("orpo").log1mexp
    x = torch.tensor([-1e-8, -50.0, -0.5, -1.0], requires_grad=True)
    y = log1mexp(x)
    assert torch.isfinite(y).all()
    assert y[0].item() == pytest.approx(math.log(1e-8), rel=1e-6)  # log(1 - exp(-1e-8)) = log(1e-8 - ...); naive: log(0)
    assert y[1].item() == pytest.approx(-math.exp(-50), rel=1e-6)  # -1.9e-22; naive log(1 - exp(x)) rounds to 0
    assert y[2].item() == pytest.approx(math.log(1 - math.exp(-0.5)), rel=1e-6) and y[3].item() == pytest.approx(math.log(1 - math.exp(-1)), rel=1e-6)
    y.sum().backward()  # d/dx = -exp(x) / (1 - exp(x)): torch.where's unused branch must not turn it into NaN
    assert torch.isfinite(x.grad).all() and x.grad[0].item() == pytest.approx(-1e8, rel=1e-3)


def test_orpo_without_its_odds_ratio_is_pref_ft_and_its_gradient_signs():
    orpo, pref_ft = load_script("orpo"), load_script("pref_ft")
    sums, lengths = torch.tensor([-12.0, -3.0, -40.0]), torch.tensor([4, 1, 9])
    rejected = torch.tensor([-2.0, -5.0, -1.0])
    nll = orpo.pref_ft_loss(sums, lengths)
    losses, _ = orpo.orpo_loss(sums / lengths, rejected, nll, 0.0)
    torch.testing.assert_close(losses, pref_ft.pref_ft_loss(sums, lengths))  # the NLL term alone is Pref-FT's loss
    aw, al = torch.tensor([-1.0, -3.0, -0.2], requires_grad=True), torch.tensor([-2.0, -0.5, -0.1], requires_grad=True)
    losses, _ = orpo.orpo_loss(aw, al, -aw, 0.1)
    losses.sum().backward()
    assert (aw.grad < 0).all() and (al.grad > 0).all()  # descent raises y_w, lowers y_l
    al.grad = None
    losses, _ = orpo.orpo_loss(aw, al, -aw, 0.0)
    losses.sum().backward()
    assert al.grad is None or (al.grad == 0).all()  # without the odds ratio, no negative gradient


# ---------------------------------------------------------------- KTO


def test_kto_loss_by_hand():
    kto_loss = load_script("kto").kto_loss
    ref = torch.tensor([-10.0, -20.0, -5.0, -7.0])
    desirable = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(ref + 0.7, ref, desirable, 0.7, 0.1, 1.5, 0.8)  # r == z0: sigmoid(0) = 1/2, times each weight
    torch.testing.assert_close(losses, torch.tensor([0.75, 0.4, 0.75, 0.4]))
    torch.testing.assert_close(rewards, torch.full((4,), 0.07))
    policy = ref + torch.tensor([2.0, 2.0, -3.0, -3.0])
    losses, rewards = kto_loss(policy, ref, desirable, 0.5, 0.1, 1.0, 1.0)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [1 - s(0.1 * (2 - 0.5)), 1 - s(0.1 * (0.5 - 2)), 1 - s(0.1 * (-3 - 0.5)), 1 - s(0.1 * (0.5 + 3))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(rewards, torch.tensor([0.2, 0.2, -0.3, -0.3]))


def test_kto_kl_is_clamped_at_zero_and_detached():
    kto_loss = load_script("kto").kto_loss
    policy, ref, desirable = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -3.0]), torch.tensor([True, False])
    at_zero, _ = kto_loss(policy, ref, desirable, 0.0, 0.1, 1.0, 1.0)
    negative, _ = kto_loss(policy, ref, desirable, -2.5, 0.1, 1.0, 1.0)
    torch.testing.assert_close(negative, at_zero)  # a negative estimate acts as 0
    kl = torch.tensor(0.4, requires_grad=True)
    p = policy.clone().requires_grad_(True)
    losses, rewards = kto_loss(p, ref, desirable, kl, 0.1, 1.0, 1.0)
    losses.sum().backward()
    assert kl.grad is None and not rewards.requires_grad  # z0 carries no gradient
    assert p.grad[0] < 0 < p.grad[1]  # descent raises a desirable response, lowers an undesirable one


def test_kto_mismatched_pairs_rotate_the_batch_by_one():
    mismatched = load_script("kto").mismatched
    B = 5  # a paired batch's examples: pair p's chosen at row p, its rejected at row B + p
    responses = torch.arange(2 * B)[:, None] * 10 + torch.arange(3)  # row i is [10 i, 10 i + 1, 10 i + 2]
    kl = mismatched(responses)
    assert torch.equal(kl[1:], responses[:-1]) and torch.equal(kl[0], responses[-1])  # example i gets example i - 1's response
    pair_of = torch.arange(2 * B) % B
    assert (pair_of.roll(1) != pair_of).all()  # never a response of its own pair (its own prompt): a mismatched pair


def test_kto_unpaired_reads_one_response_per_pair(tmp_path):
    runs = {}
    for mode in ("paired", "unpaired"):
        (tmp_path / mode).mkdir()
        _, runs[mode] = train("kto", tmp_path / mode, "bandit_r1", "--num-iterations", "2", "--batch-size", "16", "--minibatch-size", "8",
                              "--num-eval-prompts", "8", *(["--unpaired"] if mode == "unpaired" else []))
    assert [r["samples"] for r in runs["paired"]] == [0, 32, 64] and [r["samples"] for r in runs["unpaired"]] == [0, 16, 32]
    for rows in runs.values():  # both kinds present, each kind's statistics its own
        assert rows[-1]["logps/chosen"] != rows[-1]["logps/rejected"] and rows[-1]["train/kl"] >= 0
        assert rows[-1]["rewards/margins"] == pytest.approx(rows[-1]["rewards/chosen"] - rows[-1]["rewards/rejected"])


# ---------------------------------------------------------------- learning (relative to iteration 0)


def _normalised(rows, best):
    evals = [r for r in rows if "eval/gold_reward" in r]
    g0 = evals[0]["eval/gold_reward"]
    return [(r["eval/gold_reward"] - g0) / (best - g0) for r in evals], evals


@pytest.mark.parametrize("script, task, threshold", [
    ("simpo", "bandit_r1", 0.5),  # measured (seed 1, the tuned defaults, every 5 iterations): 0.55 0.78 0.77 0.77
    ("orpo", "min_length", 0.3),  # 0.59 0.48 0.43 0.41 (like Pref-FT, it peaks early)
    ("kto", "min_length", 0.3),  # 0.24 0.49 0.58 0.60
])
def test_learns_from_iteration_0(script, task, threshold, tmp_path):
    # the share of the room above pi_ref, (gold - gold_0) / (best - gold_0), best 1 (bandit) or 0 (length), rises past the
    # threshold within 20 iterations (a flipped sign moves it below 0, a dead loss leaves it at 0: the evaluation draws are seeded)
    _, rows = train(script, tmp_path, task, "--num-iterations", "20", "--eval-every", "5")
    norm, evals = _normalised(rows, 1.0 if task == "bandit_r1" else 0.0)
    assert max(norm[1:]) > threshold, norm
    assert all(e["eval/eos_rate"] > 0.9 for e in evals), [e["eval/eos_rate"] for e in evals]


# ---------------------------------------------------------------- real data (test_realdata.py's fixtures)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    from test_realdata import build_fixtures

    return build_fixtures(tmp_path_factory.mktemp("realdata"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_trains_on_ultrafeedback_rows_through_dataset(script, fixtures, tmp_path):
    import json

    out = run(script, tmp_path, "--task", "ultrafeedback", "--model", str(fixtures / "chat_lm"), "--dataset", str(fixtures / "uf"),
              "--reward-model", str(fixtures / "other_rm"), "--num-iterations", "4", "--eval-every", "2", "--learning-rate", "3e-3",
              "--batch-size", "8", "--minibatch-size", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "40 rows -> 32 pairs; dropped 8 ties" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == list(range(5)) and rows[-1]["samples"] == 2 * 32
    assert all(math.isfinite(v) for r in rows for v in r.values()) and rows[0]["eval/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert abs(rows[-1]["eval/kl_ref"]) > 1e-3  # the policy moved off pi_ref (a Monte-Carlo KL can read below 0)
