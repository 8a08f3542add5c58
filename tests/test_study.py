"""benchmarks/: the mode-seeking toy (claim 8), the study's metrics, collapse rule, budget rule, verdicts, tuning, report and
pipeline (benchmarks/study.py, protocol 2), and benchmarks/stability.py."""

import json
import math
import os
import sys

import numpy as np
import pytest
from conftest import ROOT, load_script, train
from conftest import run as run_script


def test_mode_seeking_reverse_kl_concentrates_faster_but_starts_slowly_from_zero():
    ms = load_script("mode_seeking", "benchmarks")
    p = ms.target_distribution()
    assert abs(p.sum() - 1) < 1e-12 and p[ms.WINDOW[0] : ms.WINDOW[1] + 1].sum() > 0.75  # the target mode holds ~0.77
    near_zero, some_mass = ms.starts().values()
    # measured at lr 1: with 17% on the target, mass after 50 steps is 0.632 (reverse) vs 0.548 (forward),
    # and 90% of p's mass is reached in 67 vs 127 steps
    fwd, rev = ms.descend(some_mass, p, "forward", 1.0, 130), ms.descend(some_mass, p, "reverse", 1.0, 130)
    assert rev[50] > fwd[50] + 0.05
    goal = 0.9 * p[ms.WINDOW[0] : ms.WINDOW[1] + 1].sum()
    assert ms.steps_to(rev, goal) < 0.7 * ms.steps_to(fwd, goal)
    # from pi_data (4% there) the reverse KL's pull, proportional to q, starts slowly: measured 0.024 vs 0.376 at 50 steps
    fwd, rev = ms.descend(near_zero, p, "forward", 1.0, 50), ms.descend(near_zero, p, "reverse", 1.0, 50)
    assert rev[50] < rev[0] < fwd[50]
    # both descents are exact: the forward KL's fixed point is p itself
    assert np.allclose(ms.descend(p, p, "forward", 1.0, 3), p[ms.WINDOW[0] : ms.WINDOW[1] + 1].sum())


@pytest.fixture(scope="module")
def study():
    return load_script("study", "benchmarks")


# ------------------------------------------------------------------------------ metrics on hand-made curves
def test_area_is_the_trapezoid_mean_of_the_normalised_curve_over_the_budget(study):
    rows = [{"iteration": i, "samples": 64 * i, "eval/gold_reward": g} for i, g in enumerate([-30.0, -20.0, -10.0, -10.0])]
    x, y = study.normalised(rows, best=0.0)
    assert x.tolist() == [0, 64, 128, 192] and y == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    # [0, 128]: a straight line from 0 to 2/3, mean 1/3; [0, 192]: then 64 flat at 2/3: (128 / 3 + 128 / 3) / 192 = 4/9
    assert study.area(x, y, 128) == pytest.approx(1 / 3) and study.area(x, y, 192) == pytest.approx(4 / 9)
    # a budget between evaluations cuts the line: [0, 96] rises to 1/2, mean 1/4
    assert study.area(x, y, 96) == pytest.approx(1 / 4)
    # rows without an evaluation (training rows) are skipped; a faster curve has a larger area at the same final value
    fast = [{"iteration": i, "samples": 64 * i, "eval/gold_reward": g} for i, g in enumerate([-30.0, -10.0, -10.0, -10.0])]
    fast.insert(1, {"iteration": 1, "samples": 32, "train/loss": 0.3})
    fast_area = study.area(*study.normalised(fast, 0.0), 192)
    assert fast_area == pytest.approx((64 / 3 + 2 * 128 / 3) / 192) and fast_area > study.area(x, y, 192)


def test_reach_interpolates_between_evaluations_and_is_inf_when_never_reached(study):
    x, y = np.array([0.0, 64, 128, 192]), np.array([0.0, 0.5, 1.0, 1.0])
    assert study.reach(x, y, 0.9) == pytest.approx(64 + 0.4 / 0.5 * 64) and study.reach(x, y, 0.5) == 64
    assert study.reach(x, y * 0.8, 0.9) == math.inf and study.reach(x, y + 1, 0.9) == 0


def test_area_clips_the_normalised_curve_at_minus_one_so_a_collapsed_seed_weighs_at_most_one_room(study):
    x, y = np.array([0.0, 64, 128]), np.array([0.0, -3.0, -3.0])  # a seed that lost three rooms
    assert study.area(x, y, 128) == pytest.approx((64 * -0.5 + 64 * -1.0) / 128)  # as if it had lost one
    assert study.area(x, y, 128, floor=None) == pytest.approx((64 * -1.5 + 64 * -3.0) / 128)


def rows_of(golds, eos=None, per=64):
    return [{"iteration": i, "samples": per * i, "eval/gold_reward": g, "eval/kl_ref": float(i),
             **({"eval/eos_rate": eos[i]} if eos else {})} for i, g in enumerate(golds)]


def test_collapse_rule_normalised_gold_below_minus_one_or_eos_below_half_after_iteration_0(study):
    # min_length: pi_ref at -20, the best 0; -45 is 1.25 rooms below pi_ref
    assert study.collapse(rows_of([-20.0, -10.0, -45.0, -5.0]), "min_length") == {
        "collapsed": True, "collapse_iteration": 2, "worst_normalised": pytest.approx(-1.25)}
    # the EOS rule: the policy stops ending its responses at iteration 1, before its gold falls much
    c = study.collapse(rows_of([-20.0, -25.0, -10.0], eos=[0.99, 0.3, 0.9]), "skew_length")
    assert c["collapsed"] and c["collapse_iteration"] == 1 and c["worst_normalised"] == pytest.approx(-0.25)
    # exactly -1 and exactly 0.5 do not collapse; iteration 0 (pi_ref itself) never counts; the bandits have no EOS rule
    assert not study.collapse(rows_of([-20.0, -40.0], eos=[0.4, 0.5]), "min_length")["collapsed"]
    assert not study.collapse(rows_of([0.04, 0.5], eos=[1.0, 0.0]), "bandit_r1")["collapsed"]
    assert study.collapse(rows_of([0.5, -0.6]), "bandit_r1")["collapse_iteration"] == 1  # (−0.6 − 0.5) / (1 − 0.5) = −2.2
    # training rows between evaluations are skipped
    rows = rows_of([-20.0, -10.0])
    rows.insert(1, {"iteration": 1, "samples": 64, "train/loss": 1.0})
    assert study.collapse(rows, "min_length") == {"collapsed": False, "collapse_iteration": None, "worst_normalised": pytest.approx(0.5)}


def test_budget_rule_twice_the_median_methods_median_reach_at_least_16_iterations(study):
    reaches = {"online_dpo": [300.0, 500.0, 400.0], "best_of_n": [100.0, math.inf, 900.0], "ppo": [350.0, 360.0, 2000.0],
               "dpo": [math.inf] * 3, "pref_ft": [math.inf, math.inf, 700.0]}
    # medians (a miss censored at the full length 3,840): 400, 900, 360, 3840, 3840 -> the median method 900; 2 * 900 -> 1856
    assert study.budget_rule(reaches, 64, 3840) == (1856, 900.0, {"online_dpo": 400.0, "best_of_n": 900.0, "ppo": 360.0,
                                                                   "dpo": 3840.0, "pref_ft": 3840.0})
    assert study.budget_rule({"a": [64.0] * 3, "b": [100.0] * 3}, 64, 3840)[0] == 1024  # fast methods: the 16-iteration floor
    assert study.budget_rule(reaches, 64, 1500)[0] == 1500  # never past the full length
    # one fast arm no longer sets the budget: medians 50, 360, 400, 900, 3840, 3840 -> 650, 2 * 650 -> 1344 (issue 19's rule:
    # twice the fastest, 100 -> 128)
    assert study.budget_rule({**reaches, "reinforce": [50.0] * 3}, 64, 3840)[0] == 1344


def test_budget_fixed_point_stops_at_a_repeat_and_a_cycle_takes_its_largest(study):
    assert study.fixed_point(lambda b: {3840: 2048, 2048: 1600, 1600: 1600}[b], 3840) == (1600, [3840, 2048, 1600, 1600])
    assert study.fixed_point(lambda b: {3840: 1024, 1024: 2048, 2048: 1024}[b], 3840) == (2048, [3840, 1024, 2048, 1024])


def test_bootstrap_verdicts_hold_fail_and_inconclusive(study):
    hold = study.Check("must hold", "m", [0.10, 0.20, 0.15, 0.12, 0.18]).result()
    fail = study.Check("must fail", "m", [-0.05, -0.02, -0.08, -0.01, -0.04]).result()
    unsure = study.Check("inconclusive", "m", [0.30, -0.20, 0.10, -0.10, 0.05]).result()
    assert (hold["outcome"], fail["outcome"], unsure["outcome"]) == ("holds", "fails", "inconclusive")
    assert hold["mean_diff"] == pytest.approx(0.15) and 0.1 < hold["ci90"][0] < 0.15 < hold["ci90"][1] < 0.2
    assert unsure["ci90"][0] < 0 < unsure["ci90"][1]
    assert study.bootstrap([0.3, -0.2, 0.1, -0.1, 0.05]) == study.bootstrap([0.3, -0.2, 0.1, -0.1, 0.05])  # a fixed generator
    assert study.Check("a tie", "m", [0.0] * 5).result()["outcome"] == "inconclusive"  # equal at every seed: no direction
    assert study.verdict(["holds", "holds"]) == "HOLDS"
    assert study.verdict(["holds", "fails", "inconclusive"]) == "DOES NOT HOLD"
    assert study.verdict(["holds", "inconclusive"]) == "INCONCLUSIVE"


def test_best_or_fastest_by_paired_differences_against_every_other_method(study):
    group = ("online_dpo", "online_ipo")
    beaten = {"online_dpo": [0.80, 0.70, 0.75, 0.72, 0.78], "online_ipo": [0.70, 0.60, 0.70, 0.65, 0.70],
              "dpo": [0.30, 0.35, 0.32, 0.31, 0.33], "reinforce": [0.85, 0.76, 0.80, 0.77, 0.83]}  # reinforce: +0.05 on every seed
    check = study.top_check("t", "area", beaten, group).result([1, 2, 3, 4, 5])
    assert check["outcome"] == "fails" and check["x"] == "online_dpo" and check["beaten_by"] == ["reinforce"]
    assert check["mean_diff"] == pytest.approx(-0.052) and check["diffs"] == pytest.approx([-0.05, -0.06, -0.05, -0.05, -0.05])
    # the same means, but reinforce's seeds disagree: unpaired intervals would overlap either way; paired, nothing beats online_dpo
    # and dpo is beaten: it holds
    noisy = {**beaten, "reinforce": [0.95, 0.60, 0.85, 0.62, 0.87]}
    assert study.top_check("t", "area", noisy, group).result()["outcome"] == "holds"
    tie = {n: [0.5, 0.6, 0.4, 0.55, 0.45] for n in beaten}  # nobody told apart: inconclusive
    assert study.top_check("t", "area", tie, group).result()["outcome"] == "inconclusive"
    # `among` limits the comparison (claim 5: the paper's 14 methods; a new script cannot change the verdict)
    assert study.top_check("t", "area", beaten, group, among=["online_dpo", "online_ipo", "dpo"]).result()["outcome"] == "holds"
    ranks = {r["name"]: r for r in study.ranking({"a": [1.0] * 3, "b": [1.0] * 3, "c": [0.5] * 3})}
    assert ranks["a"]["rank"] == ranks["b"]["rank"] == 1 and ranks["c"]["rank"] == 3  # the leaderboard: equal means share a rank


def test_tuning_ladders_extension_refinement_edges_and_ties(study):
    assert study.neighbour(1e-3, 1) == 3e-3 and study.neighbour(1e-3, -1) == 3e-4 and study.neighbour(3e-4, 1) == 1e-3
    assert study.neighbour(2e-3, 0) == 3e-3  # a rate off the ladder starts from the nearest on it (log distance)
    grid, limits = [1e-4, 3e-4, 1e-3], (1e-6, 1e-1)
    assert study.extend(grid, 1e-3, limits) == grid + [3e-3] and study.extend(grid, 1e-4, limits) == [3e-5] + grid
    assert study.extend(grid, 3e-4, limits) is None and study.extend(grid, 1e-3, (1e-6, 1e-3)) is None  # interior; at the limit
    assert study.extend(grid, None, limits, all_collapsed=True) == [3e-5] + grid  # every rate collapsed: look lower
    assert study.edge_flags(grid, 1e-3, limits) == (True, False) and study.edge_flags(grid, 1e-3, (1e-6, 1e-3)) == (False, True)
    assert study.edge_flags(grid + [2e-4], 3e-4, limits) == (False, False)
    assert study.pick({1e-4: -3.0, 3e-4: -1.0, 1e-3: -1.0 + 1e-8, 3e-3: float("nan"), 1e-2: None}) == 3e-4  # a tie: the smaller
    assert study.pick({0.0063: 0.5, 0.02: 0.5, 0.063: 0.1}, prefer=0.02) == 0.02  # a knob tie keeps the untuned value
    assert study.knob_ladder(0.02)[3:7] == [0.0063, 0.02, 0.063, 0.2] and study.knob_ladder(0.04, (0.01, 1.0)) == [0.013, 0.04, 0.13, 0.4]
    # the issue-19 per-task KL strengths lie on the ladders of the knobs the scripts declare
    for script in ("ppo", "grpo", "hypo"):
        field, untuned = study.knob_of(script)
        assert {d[field] for d in study.load_script(script).TASK_DEFAULTS.values()} <= set(study.knob_ladder(untuned))


def test_objectives_are_discovered_from_their_study_declarations(study):
    scripts = study.objective_scripts()
    assert scripts[:12] == study.PAPER and "sft" not in scripts and "reward_model" not in scripts
    assert study.methods_of(study.PAPER) == [m for m in study.PAPER_METHODS if m.split()[0] in study.PAPER] and len(study.PAPER_METHODS) == 14
    assert study.knob_of("ppo") == ("init_kl_coef", 0.02) and study.knob_of("dpo") is None
    with pytest.raises(SystemExit, match=r"algos/sft.py declares no STUDY"):
        study.main(study.Args(tune=True, tune_scripts=["sft"], dry_run=True))
    with pytest.raises(SystemExit, match=r"does not take --no-such-flag"):
        study.responses_per_iteration("dpo", {"no-such-flag": "1"})
    # B times the declared responses per row, on the script's Args with the run's options: HyPO's k online samples count
    assert study.responses_per_iteration("hypo", {"batch-size": "16", "num-online-samples": "4"}) == 16 * 6
    assert study.responses_per_iteration("best_of_n", {"batch-size": "64", "offline": ""}) == 64


# --------------------------------------------------------------------- response counting in the real scripts
def test_responses_are_counted_two_per_pair_and_hypos_online_samples_too(study, tmp_path):
    """`samples` counts responses: an offline pair is two, HyPO adds its k online samples per pair, an on-policy
    iteration its B completions; the study's responses_per_iteration agrees. At one seed both arms' iteration 0 is the
    same evaluation draw from pi_ref, and the dense schedule evaluates where it says."""
    size = ["--batch-size", "8", "--minibatch-size", "4", "--num-eval-prompts", "8"]
    runs = {}
    for script, extra in (("dpo", ["--eval-every", "4", "--eval-dense-every", "1", "--eval-dense-until", "2"]),
                          ("hypo", ["--num-online-samples", "3"])):
        (tmp_path / script).mkdir()
        args, rows = train(script, tmp_path / script, "bandit_r1", "--num-iterations", "5", *size, *extra)
        runs[script] = rows
        per = {"dpo": 16, "hypo": 8 * (2 + 3)}[script]
        assert [r["samples"] for r in rows] == [per * i for i in range(6)]
        opts = {k.replace("_", "-"): str(v) for k, v in args.items() if k in ("batch_size", "num_online_samples")}
        assert study.responses_per_iteration(script, opts) == per
    assert [r["train/online_samples"] for r in runs["hypo"][1:]] == [24 * i for i in range(1, 6)]  # B * k of them were drawn
    assert [r["iteration"] for r in runs["dpo"] if "eval/gold_reward" in r] == [0, 1, 2, 4, 5]  # every 1 up to 2, then every 4
    assert [r["iteration"] for r in runs["hypo"] if "eval/gold_reward" in r] == [0, 5]  # default: every 10, and the end
    assert runs["dpo"][0]["eval/gold_reward"] == runs["hypo"][0]["eval/gold_reward"]
    assert study.responses_per_iteration("online_dpo", {"batch-size": "8"}) == 8  # on-policy: B completions (smoke() runs them)
    assert study.script_args("online_dpo").num_completions == study.script_args("grpo").num_completions == 4  # one C


# ------------------------------------------------------------------------------ claims on hand-written runs
def write_run(out, run, rows, done=None):
    """A finished run as the launcher leaves it: the script's runs/<name>/metrics.jsonl, then done.json."""
    d = out / run.key / "runs" / "x"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / run.key / "done.json.tmp").write_text(json.dumps(done or {}))
    os.replace(out / run.key / "done.json.tmp", out / run.key / "done.json")


def fake_rows(start, end, margin_end, iterations, per=64):
    """Metrics of a run whose gold reward goes linearly start -> end and whose training margin grows to margin_end."""
    rows = []
    for i in range(iterations + 1):
        f = i / iterations
        row = {"iteration": i, "samples": per * i, "eval/gold_reward": start + f * (end - start), "eval/kl_ref": 3.0 * f}
        if i:
            row.update({"train/loss": 0.5, "rewards/margins": f * margin_end, "logps/chosen": -30.0 - f})
        rows.append(row)
    return rows


def fake_tuning(study, path, methods, budget=1024):
    """A protocol-2 tuning file: every method at lr 1e-3 (its knob at its untuned value), interior in its grids."""
    budgets = {t: {"samples": budget, "steps": 256} for t in study.TASKS}
    entries = {}
    for m in methods:
        knob = study.knob_of(m.split()[0])
        entries[m] = {t: {"learning_rate": 1e-3, "edge": False, "at_limit": False, "stable": True,
                          **({knob[0]: knob[1], f"{knob[0]}_edge": False} if knob else {})} for t in study.TASKS}
    path.write_text(json.dumps({"protocol": 2, "tuning_seeds": [101, 102, 103], "budgets": budgets, "scripts": entries}))
    return study.read_tuning(path)


def no_build(tasks, world=0):
    return {t: {"world": world, "weights": f"w{world}"} for t in tasks}  # hand-written runs need no task; each world its own fingerprint


def write_claim4(study, tmp_path, dpo_margin_on_min_length):
    tuning = fake_tuning(study, tmp_path / "tuning.json", ["dpo", "pref_ft"])
    budgets = study.budgets_for(study.TASKS, tuning, False, None)
    runs_of = study.plan([study.claims()[4]], [1, 2, 3, 4, 5], budgets, tuning)
    for (_, a), runs in runs_of.items():
        for run in runs:
            margin = {"pref_ft": 0.3, "dpo": dpo_margin_on_min_length if a.task == "min_length" else 0.8}[a.script]
            start, end = (0.04, 0.5) if a.task in study.BANDITS else (-20.0, -5.0)
            write_run(tmp_path / "out", run, fake_rows(start, end, margin + 0.01 * run.seed * (-1) ** run.seed, run.iterations))
    return runs_of


@pytest.mark.parametrize("dpo_margin_on_min_length,verdict,outcome", [(0.9, "HOLDS", "holds"), (0.1, "DOES NOT HOLD", "fails"),
                                                                        (0.3, "INCONCLUSIVE", "inconclusive")])
def test_claim_logic_on_hand_written_runs(study, tmp_path, monkeypatch, dpo_margin_on_min_length, verdict, outcome):
    monkeypatch.setattr(study, "prebuild", no_build)
    runs_of = write_claim4(study, tmp_path, dpo_margin_on_min_length)
    # the full length in responses: 3,840 on min_length, 64 per iteration (32 pairs): 60 iterations
    assert {r.iterations for (_, a), rs in runs_of.items() if a.task == "min_length" for r in rs} == {60}
    opts = dict(runs_of[4, study.arm("dpo", "min_length")][0].options)
    assert opts["learning-rate"] == "0.001" and opts["batch-size"] == "32"  # the tuned rate from the tuning file; 64 responses
    assert (opts["eval-dense-every"], opts["eval-dense-until"], opts["eval-every"]) == ("1", "16", "5")
    (summary,) = study.main(study.Args(claims=[4], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), tuning=str(tmp_path / "tuning.json")))
    assert summary["verdict"] == verdict
    assert [c["outcome"] for c in summary["checks"]] == ["holds", outcome]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study.validate_report(report) == [] and report["protocol"] == 2 and report["seeds"] == [1, 2, 3, 4, 5]
    assert report["claims"]["4"]["verdict"] == verdict and json.loads((tmp_path / "fig" / "report.json").read_text()) == report
    assert report["world_seeds"] == [0] and report["worlds"]["0"]["fingerprints"]["min_length"] == {"world": 0, "weights": "w0"}
    rec = report["arms"]["0"]["min_length"]["dpo"]
    assert rec["seeds"] == [1, 2, 3, 4, 5] and len(rec["area"]) == 5 and rec["collapsed"] == [False] * 5 and rec["budget"] == 1024
    assert rec["final_kl"] == pytest.approx([3.0 * 0.5 + 3.0 * 59 / 60 * 0.5] * 5)  # the mean of the last two evaluations
    text = (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "fig" / "claim4.png").stat().st_size > 10_000 and "## Claim 4: " + verdict in text
    assert f"knobs from {tmp_path / 'tuning.json'} (protocol 2, tuning seeds [101, 102, 103])" in text and "No run collapsed" in text
    if outcome != "holds":  # explained from the per-seed data
        assert "no arm of this check collapsed on any seed" in text and "tuned values: every arm interior in its grids" in text
        assert ("**disagrees with the paper**" in text) == (outcome == "fails")


SPEED = {"online_dpo": 8.0, "online_ipo": 6.0, "best_of_n_neg": 5.0, "best_of_n": 4.0, "ppo": 3.0, "dpo": 2.0, "ipo": 2.0, "simpo": 3.0}


def synthetic_rows(study, run, world=0):
    """A run whose normalised gold rises as 1 - exp(-speed * responses / 1000): online DPO fastest, offline arms slowest,
    T = 2 helps every method and T = 8 hurts all but PPO, B = 64 beats B = 512 per gradient step; HyPO's KL stays low.
    Pref-FT is faster than DPO on min_length (claim 3 fails there, everything interior: "disagrees with the paper"); online
    IPO collapses on skew_length at seed 2 (EOS 0.05 from iteration 3); in world 1, DPO is faster than online DPO on bandit_r1."""
    a, opts = run.arm, dict(run.options)
    per = study.responses_per_iteration(a.script, opts)
    speed = SPEED.get(a.script, 1.0) * (0.5 if "offline" in opts else 1.0) * {"2": 1.5, "4": 1.2, "8": 1.6 if a.script == "ppo" else 0.5}.get(
        opts.get("update-epochs"), 1.0) * 64 / per * (1 + 0.02 * run.seed)
    if a.script == "pref_ft" and a.task == "min_length":
        speed = 3.0
    if world == 1 and a.script == "dpo" and a.task == "bandit_r1":
        speed = SPEED["online_dpo"] * 1.1 * (1 + 0.02 * run.seed)
    g0, best = (0.04, 1.0) if a.task in study.BANDITS else (-28.0, 0.0)
    broken = a.script == "online_ipo" and a.task == "skew_length" and run.seed == 2 and world == 0
    rows = []
    for i in range(run.iterations + 1):
        f = -3.0 if broken and i >= 3 else 1 - math.exp(-speed * per * i / 1000)
        row = {"iteration": i, "samples": per * i, "eval/gold_reward": g0 + f * (best - g0), "eval/kl_ref": (1 if a.script == "hypo" else 10) * f,
               "eval/eos_rate": 0.05 if broken and i >= 3 else 0.99, "eval/response_length": -g0 * (1 - f)}
        if i:
            row.update({"rewards/margins": f * (2.0 if a.script == "dpo" else 0.5), "logps/chosen": -30.0 - f * (a.script == "dpo")})
        rows.append(row)
    return rows


def with_simpo(study, monkeypatch):
    """A fifth-column script: "simpo", a copy of dpo under another name (objectives are discovered from their STUDY)."""
    load, declare, exists = study.load_script, study.declaration, study.script_exists
    monkeypatch.setattr(study, "objective_scripts", lambda: study.PAPER + ["simpo"])
    monkeypatch.setattr(study, "load_script", lambda s, folder="algos": load("dpo" if s == "simpo" else s, folder))
    monkeypatch.setattr(study, "declaration", lambda s: declare("dpo" if s == "simpo" else s))
    monkeypatch.setattr(study, "script_exists", lambda s: exists("dpo" if s == "simpo" else s))
    study.parsed_args.cache_clear()


def test_every_claim_judges_explains_and_plots_hand_written_runs_on_two_worlds(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "prebuild", no_build)
    with_simpo(study, monkeypatch)
    draw = study.objective_figure  # one figure per script takes a second each: two are enough here
    monkeypatch.setattr(study, "objective_figure", lambda res, script, *a: draw(res, script, *a) if script in ("dpo", "simpo") else None)
    methods = study.PAPER_METHODS + ["simpo"]
    tuning = fake_tuning(study, tmp_path / "tuning.json", methods)
    budgets = study.budgets_for(study.TASKS, tuning, False, None)
    all_claims = study.claims(["simpo"])
    for world, seeds, numbers, out in ((0, [1, 2, 3], range(1, 10), tmp_path / "out"), (1, [1, 2, 3], (1, 2, 3, 5), tmp_path / "out" / "world1")):
        runs_of = study.plan([all_claims[n] for n in numbers], seeds, budgets, tuning)
        for run in {r for rs in runs_of.values() for r in rs}:
            if run.arm.script == "mode_seeking":
                ms = load_script("mode_seeking", "benchmarks")
                (out / run.key).mkdir(parents=True)
                (out / run.key / "result.json").write_text(json.dumps(ms.run(ms.Args(figure=None))))
                (out / run.key / "done.json").write_text("{}")
            else:
                write_run(out, run, synthetic_rows(study, run, world))
    docs = tmp_path / "docs"
    (docs / "objectives").mkdir(parents=True)
    (docs / "objectives" / "dpo.md").write_text(f"# DPO\n\nprose\n\n{study.PAGE_START}\nold numbers\n{study.PAGE_END}\n\nmore prose\n")
    (docs / "objectives" / "ipo.md").write_text("# IPO, no markers\n")
    summary = study.main(study.Args(seeds=[1, 2, 3], world_seeds=[0, 1], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"),
                                    tuning=str(tmp_path / "tuning.json"), pages=str(docs)))
    assert [len(s["checks"]) for s in summary] == [8, 6, 14, 2, 15, 7, 2, 2, 4]
    outcomes = {s["claim"]: [c["outcome"] for c in s["checks"]] for s in summary}
    # the synthetic world: on-policy beats offline everywhere by the same share of the room, so "the gap shrinks" is a tie
    assert outcomes[1] == ["holds", "inconclusive"] * 4 and outcomes[5] == ["holds"] * 15 and outcomes[6] == ["holds"] * 7
    assert outcomes[2] == ["holds", "inconclusive", "inconclusive", "inconclusive", "holds", "inconclusive"]  # online_ipo's seed 2
    assert outcomes[4] == ["holds", "holds"] and outcomes[9] == ["holds"] * 4 and outcomes[7] == ["holds", "inconclusive"]
    assert outcomes[8] == ["holds", "holds"]
    # offline Best-of-N is as fast as dpo and ipo here; pref_ft beats both on min_length
    assert outcomes[3] == ["holds", "inconclusive", "holds"] * 2 + ["holds"] + ["fails", "inconclusive", "holds"] * 2 + ["holds"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study.validate_report(report) == [] and sorted(report["claims"], key=int) == [str(n) for n in range(1, 10)]
    assert all((tmp_path / "fig" / f"claim{n}.png").stat().st_size > 10_000 for n in range(1, 10))
    assert (tmp_path / "fig" / "claim3_checks.png").exists()
    # world 1: the same checks on seeds 1-3; there DPO is faster than online DPO on bandit_r1
    first = report["claims"]["1"]["checks"][0]
    assert first["worlds"]["1"]["outcome"] == "fails" and not first["worlds"]["1"]["agrees"] and first["worlds"]["1"]["seeds"] == [1, 2, 3]
    assert report["claims"]["1"]["world1_verdict"] == "DOES NOT HOLD" and 4 not in report["worlds"]["1"]["claims"]
    assert report["worlds"]["1"]["fingerprints"]["bandit_r1"] == {"world": 1, "weights": "w1"}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "world 1: fails" in text and "DISAGREES" in text and '"weights": "w1"' in text
    # the collapse: counted, explained, and left out to show what the other seeds say
    assert "| 0 | skew_length | online_ipo | 1 of 3 | 2 (3) |" in text
    ipo = report["claims"]["2"]["checks"][2]
    assert ipo["explanation"][0].startswith("online_ipo on skew_length collapsed: seed 2 at iteration 3 (EOS 0.05, KL -30); worst normalised gold -3.00")
    assert "excluding them (seeds 1, 3): " in ipo["explanation"][0] and ipo["label"] is None
    assert report["arms"]["0"]["skew_length"]["online_ipo"]["collapsed"] == [False, True, False]
    assert report["arms"]["0"]["skew_length"]["online_ipo"]["collapse_iteration"] == [None, 3, None]
    # a failure with every arm interior and no collapse disagrees with the paper
    pref = report["claims"]["3"]["checks"][7]
    assert pref["name"].startswith('min_length: "Offline, a negative gradient beats maximum likelihood": dpo > pref_ft')
    assert pref["label"] == "disagrees with the paper" and "dpo (min_length) gold" in pref["explanation"][1]
    assert len(pref["diffs"]) == 3 and pref["mean_diff"] == pytest.approx(np.mean(pref["diffs"]))
    # beyond the paper: simpo on claim 5's leaderboard against dpo, outside the checks
    b = report["beyond"]["simpo"]
    assert b["sibling"] == "dpo" and b["tasks"]["bandit_r1"]["diff_mean"] > 0 and b["tasks"]["bandit_r1"]["of"] == 15
    assert "## Beyond the paper" in text and "simpo" not in json.dumps(report["claims"]["5"]["checks"][0]["pairs"])
    # the teaching pages: the block between the markers is the renderer's, the rest of the page is kept
    page = (docs / "objectives" / "dpo.md").read_text()
    assert page == f"# DPO\n\nprose\n\n{study.PAGE_START}\n{study.objective_results(report, 'dpo')}\n{study.PAGE_END}\n\nmore prose\n"
    assert "| dpo | " in page and "| 3 | min_length: " in page and (docs / "objectives" / "ipo.md").read_text() == "# IPO, no markers\n"
    assert (tmp_path / "fig" / "objectives" / "dpo.png").stat().st_size > 10_000 and (tmp_path / "fig" / "objectives" / "simpo.png").exists()
    bad = json.loads(json.dumps(report))
    bad["arms"]["0"]["min_length"]["dpo"]["area"][0] += 0.5  # its mean no longer matches
    bad["claims"]["1"]["checks"][0]["diffs"][0] += 1.0  # nor its interval
    bad["claims"]["1"]["checks"][0]["worlds"]["1"]["agrees"] = True
    assert len(study.validate_report(bad)) == 3


def test_report_schema_protocol_1_and_the_committed_report(study):
    good = {"seeds": [1], "tuning_seeds": [], "wall_s": 1.0, "workers": 1,
            "claims": {"1": {"verdict": "HOLDS", "checks": [{"name": "n", "metric": "m", "mean_diff": 1.0, "ci90": [0.5, 1.5], "outcome": "holds"}]}}}
    assert study.validate_report(good) == []
    bad = json.loads(json.dumps(good))
    bad["claims"]["1"]["verdict"] = "DOES NOT HOLD"  # its checks hold or are malformed: nothing fails
    bad["claims"]["1"]["checks"].append({"name": "n", "outcome": "maybe"})
    del bad["workers"]
    assert len(study.validate_report(bad)) == 3
    assert "missing arms" in study.validate_report(good | {"protocol": 2})


def test_the_committed_report_passes_its_schema_and_covers_every_claim(study):
    """benchmarks/figures/report.json, from the final study run (issue 19, protocol 1, until the protocol-2 re-run replaces
    it): its verdicts follow from its checks, and it renders the teaching pages' blocks."""
    report = json.loads((ROOT / "benchmarks" / "figures" / "report.json").read_text())
    assert study.validate_report(report) == []
    assert sorted(report["claims"], key=int) == [str(n) for n in range(1, 10)] and report["seeds"] == [1, 2, 3, 4, 5]
    assert not set(report["seeds"]) & set(report["tuning_seeds"])  # tuned on seeds it does not report
    block = study.objective_results(report, "online_dpo")
    assert "| 7 | min_length: \"Fresher data" in block and "| 5 | bandit_r1" in block and "| 3 |" not in block  # claim 3: offline only
    assert "| 3 | bandit_r1: \"Offline, a negative gradient beats maximum likelihood\": dpo > pref_ft" in study.objective_results(report, "dpo")
    if report.get("protocol", 1) == 1:  # issue 19 kept no per-arm values: the checks, and the command that makes the table
        assert "comes with the protocol-2 re-run" in block
    else:
        assert report["world_seeds"][:1] == [0] and all(f"**{t}**" in block for t in study.TASKS)


def test_missing_tuning_missing_script_and_failed_run(study, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"does not exist: run `python benchmarks/study.py --tune` first \(or pass --quick\)"):
        study.main(study.Args(claims=[4], tuning=str(tmp_path / "nothing.json"), out=str(tmp_path)))
    with pytest.raises(SystemExit, match=r"unknown claim ids \[12\]"):
        study.main(study.Args(claims=[1, 12]))
    issue19 = tmp_path / "issue19.json"  # its "protocol" was a sentence
    issue19.write_text(json.dumps({"protocol": "issue 19", "budgets": {}, "scripts": {}}))
    with pytest.raises(SystemExit, match=r"is the issue-19 tuning \(protocol 1\)"):  # its budgets are shorter than protocol 2's floor
        study.main(study.Args(claims=[4], out=str(tmp_path), tuning=str(issue19), figures=str(tmp_path / "fig")))
    monkeypatch.setattr(study, "prebuild", no_build)
    write_claim4(study, tmp_path, 0.9)
    monkeypatch.setattr(study, "script_exists", lambda script: script != "hypo")
    fake_tuning(study, tmp_path / "tuning.json", ["dpo", "pref_ft", "hypo"])
    tuning = study.read_tuning(tmp_path / "tuning.json")
    runs_of = study.plan([study.claims()[4]], [1, 2, 3, 4, 5], study.budgets_for(study.TASKS, tuning, False, None), tuning)
    (tmp_path / "out" / runs_of[4, study.arm("dpo", "bandit_r1")][0].key / "done.json").unlink()  # not done: rerun, and it fails
    monkeypatch.setattr(study.Run, "command", lambda self: [sys.executable, "-c", "import sys; sys.exit('cannot train: boom')"])
    summary = study.main(study.Args(claims=[9, 4], world_seeds=[0], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"),
                                    tuning=str(tmp_path / "tuning.json")))
    assert [s["verdict"] for s in summary] == ["MISSING", "FAILED"]
    assert "hypo" in summary[0]["numbers"][0] and "cannot train: boom" in "\n".join(summary[1]["numbers"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["claims"] == {}  # only judged claims enter report.json
    # a second world that tasks/ does not tell apart from the first is refused
    fake_tuning(study, tmp_path / "every.json", study.PAPER_METHODS)
    monkeypatch.setattr(study, "prebuild", lambda tasks, world=0: {t: None for t in tasks})  # tasks/ before issue 27
    with pytest.raises(SystemExit, match=r"--world-seeds 1: tasks/ records no task.info\['fingerprint'\]"):
        study.main(study.Args(claims=[1], world_seeds=[0, 1], out=str(tmp_path / "w"), tuning=str(tmp_path / "every.json")))
    monkeypatch.setattr(study, "prebuild", lambda tasks, world=0: {t: {"weights": "same"} for t in tasks})  # a variable it ignores
    with pytest.raises(SystemExit, match=r"has the same fingerprint as in world 0"):
        study.main(study.Args(claims=[1], world_seeds=[0, 1], out=str(tmp_path / "w"), tuning=str(tmp_path / "every.json")))


def test_too_few_evaluations_inside_a_budget_are_refused_and_claim7_shares_eight(study, tmp_path):
    tuning = fake_tuning(study, tmp_path / "tuning.json", study.PAPER_METHODS)
    budgets = study.budgets_for(study.TASKS, tuning, False, None)
    chosen = list(study.claims().values())
    runs_of = study.plan(chosen, [1], budgets, tuning)
    assert study.sparse(chosen, runs_of, budgets) == []  # 16 iterations: 17 evaluations; claim 7: 9 shared every 32 steps
    run7 = runs_of[7, study.claims()[7].arms[3][0]][0]  # B = 512: 8 iterations of 32 steps, evaluated at each
    assert run7.iterations == 8 and study.evaluation_iterations(run7) == list(range(9)) and budgets["min_length"]["steps"] == 256
    run64 = runs_of[7, study.claims()[7].arms[0][0]][0]
    assert run64.iterations == 64 and len(study.evaluation_iterations(run64)) == 33
    short = runs_of[5, study.arm_of("ppo", "bandit_r2")][0]  # claim 5 only: 16 iterations, evaluated at each
    full = runs_of[4, study.arm_of("dpo", "bandit_r1")][0]  # claims 3 and 4 share it: the full length, every 5 after 16
    assert short.iterations == 16 and study.evaluation_iterations(short) == list(range(17))
    assert full.iterations == 100 and study.evaluation_iterations(full)[15:19] == [15, 16, 20, 25] and len(study.evaluation_iterations(full)) == 34
    shorter = study.budgets_for(study.TASKS, fake_tuning(study, tmp_path / "short.json", study.PAPER_METHODS, budget=512), False, None)
    assert (5, "ppo", "bandit_r2", 9) in study.sparse(chosen, study.plan(chosen, [1], shorter, tuning), shorter)  # 8 iterations: 9


# ------------------------------------------------------------------------------------- the tuning, on hand-made curves
def tuning_rows(run):
    """A tuning run on min_length (pi_ref -28) whose normalised gold rises as q (1 - exp(-i / 5)), q peaking at lr 2e-3 and,
    for grpo, at beta 0.013. Two collapses (EOS rate 0.1 from iteration 20): lr 1e-2 at seed 101, so its later seeds never
    run, and lr 1.5e-3 (a refined rate, the best on its first two seeds) at seed 103 only, so it cannot win."""
    opts = dict(run.options)
    lr, beta = float(opts["learning-rate"]), float(opts.get("beta", 0.013))
    q = math.exp(-((math.log10(lr) - math.log10(2e-3)) ** 2) / 0.5) * math.exp(-((math.log10(beta) - math.log10(0.013)) ** 2) / 8)
    q *= 1 + 0.01 * (run.seed - 102)
    broken = (lr == 1e-2 and run.seed == 101) or (lr == 1.5e-3 and run.seed == 103)
    return [{"iteration": i, "samples": 64 * i, "eval/gold_reward": -28.0 * (1 - q * (1 - math.exp(-i / 5))),
             "eval/eos_rate": 0.1 if broken and i >= 20 else 0.99, "eval/kl_ref": float(i)} for i in range(run.iterations + 1)]


def fake_executor(study, rows_of):
    """Launcher.execute without a subprocess: hand-made rows, done.json as the launcher writes it (skip, and the stop at a
    collapse, included)."""

    def execute(self, run):
        if self.skip(run):
            return None
        rows = rows_of(run)
        c = study.collapse(rows, run.arm.task)
        stopped = {}
        if self.stop_on_collapse and c["collapsed"]:
            rows, stopped = [r for r in rows if r["iteration"] <= c["collapse_iteration"]], {"stopped_at": c["collapse_iteration"]}
        write_run(self.out, run, rows, {"wall_s": 1.0, **c, **stopped})
        return None

    return execute


def test_tuning_on_hand_made_curves_extends_refines_prunes_and_never_picks_a_collapse(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "prebuild", lambda tasks, world=0: {})
    monkeypatch.setattr(study.Launcher, "execute", fake_executor(study, tuning_rows))
    args = study.Args(tune=True, tune_scripts=["dpo", "grpo"], tune_tasks=["min_length"], tune_rates=[3e-4, 1e-3], workers=2,
                      out=str(tmp_path), tuning=str(tmp_path / "not_written.json"))
    result = study.main(args)
    dpo, grpo = result["scripts"]["dpo"]["min_length"], result["scripts"]["grpo"]["min_length"]
    # 1e-3 wins at the top of {3e-4, 1e-3}: 3e-3 joins and wins at the top, 1e-2 joins and collapses at seed 101 (not run on
    # 103): 3e-3 is interior. The refinement adds 1.5e-3 and 6e-3; 1.5e-3, the best on seeds 101 and 102, collapses at
    # seed 103 and cannot win. 3e-4's two areas could not reach the winner's median: its seed 103 never ran
    assert list(dpo["scores"]) == ["0.0003", "0.001", "0.0015", "0.003", "0.006", "0.01"] and result["rounds"] == 3
    assert dpo["learning_rate"] == 3e-3 and dpo["refined"] == [1.5e-3, 6e-3] and not dpo["edge"] and not dpo["at_limit"] and dpo["stable"]
    assert dpo["collapsed"]["0.0015"] == [False, False, True] and dpo["scores"]["0.0015"] is None
    # (seed 102 of 1e-2 may start beside seed 101 at two workers; it is never started once 101 has collapsed)
    assert dpo["collapsed"]["0.01"][0] is True and dpo["collapsed"]["0.01"][2] is None and dpo["areas"]["0.01"] == [None, None, None]
    assert dpo["areas"]["0.0003"][2] is None and dpo["areas"]["0.0003"][0] is not None and dpo["scores"]["0.0003"] is None
    assert dpo["scores"]["0.003"] == pytest.approx(np.median(dpo["areas"]["0.003"])) and dpo["scores"]["0.003"] > max(dpo["areas"]["0.006"][:2])
    assert result["runs_stopped_at_collapse"] == 4 and result["edges_left"] == 0 and not result["capped"]
    # grpo's knob at its winning rate: 0.013 wins at the bottom of {0.013, 0.04, 0.13}, 0.004 joins, then 0.0065 and 0.026
    assert grpo["learning_rate"] == 3e-3 and grpo["beta"] == 0.013 and grpo["beta_untuned"] == 0.04 and not grpo["beta_edge"]
    assert list(grpo["beta_scores"]) == ["0.004", "0.0065", "0.013", "0.026", "0.04", "0.13"] and grpo["beta_refined"] == [0.0065, 0.026]
    assert grpo["beta_areas"]["0.04"] == grpo["areas"]["0.003"]  # the rate sweep's runs, at the untuned beta
    # the budget: twice the median method's median reach of 90%, rounded up to a whole iteration, at least 16 iterations
    b = result["budgets"]["min_length"]
    assert set(b["reach90"]) == {"dpo", "grpo"} and b["trace"][0] == 3840 and b["trace"][-1] == b["samples"]
    assert b["samples"] == max(1024, math.ceil(2 * np.median(list(b["reach90"].values())) / 64) * 64) and 1024 < b["samples"] < 3840
    assert json.loads((tmp_path / "tune" / "tuning.json").read_text()) == result and not (tmp_path / "not_written.json").exists()
    # an emergency cap leaves an edge, and says so
    capped = study.main(study.Args(**{**vars(args), "tune_rounds": 1, "out": str(tmp_path / "capped")}))
    entry = capped["scripts"]["dpo"]["min_length"]
    assert entry["capped"] and entry["edge"] and entry["learning_rate"] == 2e-3 and capped["capped"] == ["dpo on min_length", "grpo on min_length"]
    study.print_tuning(result)  # prints the TASK_DEFAULTS rows it implies
    # a partial tuning (a new script, here dpo alone) keeps a protocol-2 file's budgets and, with --tune-merge, joins it
    (tmp_path / "tuning.json").write_text(json.dumps(result | {"budgets": {"min_length": {"samples": 2048, "steps": 256}}}))
    part = study.main(study.Args(**{**vars(args), "tune_scripts": ["dpo"], "tuning": str(tmp_path / "tuning.json"), "tune_merge": True,
                                    "out": str(tmp_path / "part")}))
    assert part["budgets"]["min_length"]["samples"] == 2048 and part["budgets"]["min_length"]["trace"] == [2048]
    merged = json.loads((tmp_path / "tuning.json").read_text())
    assert merged["scripts"]["dpo"]["min_length"] == part["scripts"]["dpo"]["min_length"] and "grpo" in merged["scripts"]



def test_a_tuning_continues_from_its_ledger_in_another_sitting_and_refuses_another_worlds_ledger(study, tmp_path, monkeypatch):
    world = {"min_length": {"world_seed": 0, "length_mode": 22, "pi_ref_sha256": "66b3c1419658"}}
    monkeypatch.setattr(study, "prebuild", lambda tasks, world_=0: json.loads(json.dumps(world)))
    ran, execute = [], fake_executor(study, tuning_rows)
    monkeypatch.setattr(study.Launcher, "execute", lambda self, run: ran.append(run.key) or execute(self, run))
    ledger = tmp_path / "ledger.jsonl"
    # one worker: which runs start is then the same in every sitting (at two, a collapsing rate's seed 102 may start beside 101)
    args = study.Args(tune=True, tune_scripts=["dpo"], tune_tasks=["min_length"], tune_rates=[3e-4, 1e-3], workers=1,
                      out=str(tmp_path / "first"), tuning=str(tmp_path / "not_written.json"), tune_ledger=str(ledger))
    first = study.main(args)
    finished = [k for k in dict.fromkeys(ran) if (tmp_path / "first" / "tune" / k / "done.json").exists()]
    lines = ledger.read_text().splitlines()
    assert json.loads(lines[0]) == {"fingerprints": world} and sorted(json.loads(x)["key"] for x in lines[1:]) == sorted(finished)
    same = lambda r: {k: v for k, v in r.items() if k not in ("wall_s", "runs_restored", "command")}  # noqa: E731
    # another sitting on a fresh OUT (another machine): every run comes from the ledger, none runs again, the same result
    ran.clear()
    second = study.main(study.Args(**{**vars(args), "out": str(tmp_path / "second")}))
    assert ran == [] and second["runs_restored"] == len(finished) and same(second) == same(first)
    # a sitting killed mid-line: the cut line and the runs after it are run again, and the result is the same
    ledger.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:40])
    third = study.main(study.Args(**{**vars(args), "out": str(tmp_path / "third")}))
    again = [k for k in dict.fromkeys(ran) if (tmp_path / "third" / "tune" / k / "done.json").exists()]
    assert sorted(again) == sorted(json.loads(x)["key"] for x in lines[-3:]) and same(third) == same(first)
    kept = [json.loads(x)["key"] for x in ledger.read_text().splitlines()[1:]]
    assert kept[:-3] == [json.loads(x)["key"] for x in lines[1:-3]] and sorted(kept[-3:]) == sorted(again)  # the cut line dropped
    # a run made by other code (its script changed since) is not restored: every one runs again
    monkeypatch.setattr(study.Ledger, "code", staticmethod(lambda script, real=study.Ledger.code: real(script) + "-edited"))
    ran.clear()
    fifth = study.main(study.Args(**{**vars(args), "out": str(tmp_path / "fifth")}))
    assert fifth["runs_restored"] == 0 and sorted(k for k in set(ran) if (tmp_path / "fifth" / "tune" / k / "done.json").exists()) == sorted(finished)
    # a machine that builds another world refuses the ledger instead of mixing its runs with its own
    world["min_length"]["pi_ref_sha256"] = "526fe8062b11"
    with pytest.raises(SystemExit, match=r"ledger.jsonl: its runs come from another world"):
        study.main(study.Args(**{**vars(args), "out": str(tmp_path / "fourth")}))


def test_tuning_dry_run_counts_and_costs(study, capsys):
    assert study.main(study.Args(tune=True, dry_run=True, workers=2)) is None
    out = capsys.readouterr().out
    methods = len(study.methods_of(study.objective_scripts()))  # the paper's 14, and every fork's (with its variants)
    knobs = sum(study.declaration(s)["knob"] is not None for s in study.objective_scripts())  # ppo, grpo, hypo, best_of_n_neg
    assert f"{5 * methods} learning-rate grids, seeds [101, 102, 103]" in out and "expected in all: about" in out
    assert f"per knob grid ({5 * knobs})" in out and methods >= 14 and knobs >= 4
    assert study.main(study.Args(dry_run=True, workers=2)) is None  # the study: at a protocol-2 tuning's budgets, one estimate
    out = capsys.readouterr().out
    scenarios = 1 if study.read_tuning(study.TUNING)["protocol"] == 2 else 2  # an issue-19 tuning: two budget scenarios
    assert out.count("in all: about") == scenarios and "world 1: claims [1, 2, 3, 5], seeds [1, 2, 3]" in out


# ------------------------------------------------------------------------------------- the real pipeline
def test_a_run_from_the_fork_server_logs_what_a_new_interpreter_logs(study, tmp_path):
    # the launcher's runs are children of a server that imported torch once (start_script): the same numbers, row by row
    run = study.make_run(study.arm("online_dpo", "bandit_r1"), 7, 3 * study.BATCH)
    rows = {}
    for how in ("fork", "new"):
        (tmp_path / how).mkdir()
        if how == "fork":
            proc = study.start_script(run.command(), tmp_path / how, {"CLEANPREF_WORLD_SEED": os.environ.get("CLEANPREF_WORLD_SEED", "0")})
            proc.join()
            assert proc.exitcode == 0, (tmp_path / how / "stderr.txt").read_text()[-2000:]
        else:
            assert run_script("online_dpo", tmp_path / how, *run.command()[2:]).returncode == 0
        rows[how] = [{k: v for k, v in r.items() if k != "time_s"} for r in study.read_rows(tmp_path / how)]
    assert len(rows["fork"]) == 4 and rows["fork"] == rows["new"]
    assert (tmp_path / "fork" / "stdout.txt").read_text().startswith("run bandit_r1__online_dpo__7__")  # its output, in its directory


def test_a_tiny_tuning_runs_the_real_scripts_and_writes_its_result(study, tmp_path):
    # one rate held at the limits (the rules are test_tuning_on_hand_made_curves_...'s); grpo's knob on {0.04, 0.13} and its refinement
    args = study.Args(tune=True, tune_scripts=["dpo", "grpo"], tune_tasks=["bandit_r1"], tuning_seeds=[101], tune_rates=[1e-3],
                      tune_limits=(1e-3, 1e-3), tune_knob_limits=(0.04, 0.13), max_iterations=2, workers=2, out=str(tmp_path),
                      tuning=str(tmp_path / "not_written.json"))
    result = study.main(args)
    assert not (tmp_path / "not_written.json").exists()  # a partial tuning stays under OUT/tune
    assert json.loads((tmp_path / "tune" / "tuning.json").read_text()) == json.loads(json.dumps(result))
    for m in ("dpo", "grpo"):
        e = result["scripts"][m]["bandit_r1"]
        assert e["learning_rate"] == 1e-3 and list(e["scores"]) == ["0.001"] and math.isfinite(e["scores"]["0.001"])
        assert e["at_limit"] and not e["edge"] and e["refined"] == []  # x2 and /2 lie outside the limits
    g = result["scripts"]["grpo"]["bandit_r1"]
    assert set(g["beta_scores"]) == {"0.04", "0.13", "0.08" if g["beta"] == 0.04 else "0.065"} and g["beta"] in (0.04, 0.13, 0.08, 0.065)
    done = json.loads(next((tmp_path / "tune").glob("bandit_r1__grpo__*__s101/done.json")).read_text())
    assert done["collapsed"] is False and done["collapse_iteration"] is None and "worst_normalised" in done  # every run records it
    b = result["budgets"]["bandit_r1"]
    assert b["samples"] == 128 and b["steps"] == 256  # capped runs: 2 iterations of 64; claim 7's 256 gradient steps


def test_quick_study_runs_its_pipeline_end_to_end_and_resumes(study, tmp_path, monkeypatch):
    args = study.Args(quick=True, claims=[4, 8, 9], max_iterations=2, out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), workers=2,
                      tuning=str(tmp_path / "none.json"))
    summary = study.main(args)
    assert [len(s["checks"]) for s in summary] == [2, 2, 4] and all(s["verdict"] in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE") for s in summary)
    assert all((tmp_path / "fig" / f"claim{n}.png").exists() for n in (4, 8, 9))
    assert len(list((tmp_path / "out").glob("*/done.json"))) == 8  # 7 runs and the toy: dpo on min_length serves claims 4 and 9
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study.validate_report(report) == [] and report["world_seeds"] == [0]  # --quick: the main world only
    assert set(report["worlds"]["0"]["fingerprints"]) == {"bandit_r1", "min_length", "skew_length"}  # read from tasks/ (None before issue 27)
    monkeypatch.setattr(study.Launcher, "execute", lambda self, run: pytest.fail(f"{run.key} ran again"))
    assert [s["checks"] for s in study.main(args)] == [s["checks"] for s in summary]  # resumed: nothing rerun, the same result


def test_stability_runs_a_script_at_its_defaults_on_each_seed_and_counts_collapses(tmp_path, capsys):
    stability = load_script("stability", "benchmarks")
    rows = stability.main(stability.parse(["--script", "reinforce", "--task", "bandit_r1", "--seeds", "1-2", "--workers", "2",
                                           "--out", str(tmp_path), "--", "--num-iterations", "2"]))
    assert [r["seed"] for r in rows] == [1, 2] and all(r["collapsed"] is False and r["final_gold"] > 0 for r in rows)
    assert all(set(r) >= {"collapse_iteration", "worst_normalised", "max_kl", "min_eos"} for r in rows)
    captured = capsys.readouterr()
    out = captured.out
    assert "0 of 2 collapsed" in out and "reinforce on bandit_r1" in out
    assert "runs: 2/2 in" in captured.err and "\r" not in captured.err  # not a terminal: plain progress lines, no bar (issue 29)
    (d,) = [p for p in tmp_path.iterdir() if p.name.endswith("__s1")]
    assert d.name == "bandit_r1__reinforce__num-iterations=2__s1" and json.loads((d / "done.json").read_text())["collapsed"] is False
    assert stability.seeds_of(["1-3", "7", "9,10"]) == [1, 2, 3, 7, 9, 10]
    with pytest.raises(SystemExit, match="declares no STUDY"):
        stability.main(stability.parse(["--script", "sft", "--task", "bandit_r1"]))
