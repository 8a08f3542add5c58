"""benchmarks/: the mode-seeking toy (claim 8), and the study's metrics, budget rule, verdicts, tuning and pipeline."""

import json
import math
import sys

import numpy as np
import pytest
from conftest import ROOT, load_script, train


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


def test_budget_rule_twice_the_fastest_median_rounded_up_to_a_whole_iteration(study):
    reaches = {("online_dpo", 1e-3): [300.0, 500.0], ("best_of_n", 1e-3): [100.0, math.inf], ("ppo", 3e-4): [350.0, 360.0]}
    # medians: 400, inf (one seed never got there), 355 -> ppo; 2 * 355 = 710 -> 768, a whole iteration of 64
    assert study.budget_rule(reaches, 64, 3840) == (768, ("ppo", 3e-4), 355.0)
    assert study.budget_rule(reaches, 64, 640) == (640, ("ppo", 3e-4), 355.0)  # never past the full length
    assert study.budget_rule({("dpo", 1e-4): [math.inf, math.inf]}, 64, 3840) == (3840, None, math.inf)  # no curve gets there
    assert study.budget_rule({("a", 1.0): [64.0, 64.0]}, 32, 416)[0] == 128  # gradient steps: whole iterations of 32


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


def test_ties_share_a_rank_and_the_top_group_is_the_intervals_reaching_the_best(study):
    values = {"best_of_n_neg": [1.0] * 5, "online_dpo": [1.0] * 5, "online_ipo": [0.99, 1.0, 0.98, 1.0, 0.97],
              "dpo": [0.3, 0.35, 0.32, 0.31, 0.33]}
    ranks = {r["name"]: r for r in study.ranking(values)}
    assert ranks["best_of_n_neg"]["rank"] == ranks["online_dpo"]["rank"] == 1 and ranks["online_ipo"]["rank"] == 3
    assert [ranks[n]["top"] for n in values] == [True, True, False, False]  # online_ipo's interval ends below 1.0
    group = ("online_dpo", "online_ipo")
    # a tie at the top holds, whatever the order of the arms
    for order in (values, dict(reversed(values.items()))):
        check = study.top_check("t", "area", order, group).result()
        assert check["outcome"] == "holds" and check["mean_diff"] == 0
    assert study.top_check("t", "area", {**values, "online_dpo": [0.9] * 5}, group).result()["outcome"] == "fails"
    everyone = {n: [0.5, 0.6, 0.4, 0.55, 0.45] for n in values}  # nobody told apart: the ranking says nothing
    assert study.top_check("t", "area", everyone, group).result()["outcome"] == "inconclusive"


def test_the_tuning_grid_extends_past_edge_winners_within_limits(study):
    assert study.neighbour(1e-3, 1) == 3e-3 and study.neighbour(1e-3, -1) == 3e-4 and study.neighbour(3e-4, 1) == 1e-3
    grid = [1e-4, 3e-4, 1e-3]
    assert study.extend(grid, 1e-3, (1e-6, 1e-1)) == grid + [3e-3] and study.extend(grid, 1e-4, (1e-6, 1e-1)) == [3e-5] + grid
    assert study.extend(grid, 3e-4, (1e-6, 1e-1)) is None and study.extend(grid, 1e-3, (1e-6, 1e-3)) is None  # interior; at the limit
    assert study.pick({1e-4: -3.0, 3e-4: -1.0, 1e-3: -1.0 + 1e-8, 3e-3: float("nan")}) == 3e-4  # a tie goes to the smaller rate
    assert study.pick({0.0063: 0.5, 0.02: 0.5, 0.063: 0.1}, prefer=0.02) == 0.02  # a KL tie keeps the default
    for script, (knob, values) in study.KL_KNOBS.items():  # 3-point KL grids; the scripts' per-task strengths come from them
        assert values[0] < values[1] < values[2] and getattr(study.script_args(script), knob) is None  # None: per task
        assert {d[knob] for d in study.load_script(script).TASK_DEFAULTS.values()} <= set(values)


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
def write_run(out, run, rows):
    """A finished run as the launcher leaves it: done.json, and the script's runs/<name>/metrics.jsonl."""
    d = out / run.key / "runs" / "x"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / run.key / "done.json").write_text("{}")


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


def fake_tuning(study, path, scripts):
    budgets = {t: {"samples": 640, "steps": 64} for t in study.TASKS}
    entries = {s: {t: {"learning_rate": 1e-3, **({study.KL_KNOBS[s][0]: 0.02} if s in study.KL_KNOBS else {})} for t in study.TASKS}
               for s in scripts}
    path.write_text(json.dumps({"tuning_seeds": [101, 102], "budgets": budgets, "scripts": entries}))
    return study.read_tuning(path)


def write_claim4(study, tmp_path, dpo_margin_on_min_length):
    tuning = fake_tuning(study, tmp_path / "tuning.json", ["dpo", "pref_ft"])
    budgets = study.budgets_for(study.TASKS, tuning, False, None)
    runs_of = study.plan([study.claims()[4]], [1, 2, 3, 4, 5], budgets, tuning)
    for (_, a), runs in runs_of.items():
        for run in runs:
            margin = {"pref_ft": 0.3, "dpo": dpo_margin_on_min_length if a.task == "min_length" else 0.8}[a.script]
            write_run(tmp_path / "out", run, fake_rows(0.0, 0.5, margin + 0.01 * run.seed * (-1) ** run.seed, run.iterations))
    return runs_of


@pytest.mark.parametrize("dpo_margin_on_min_length,verdict,outcome", [(0.9, "HOLDS", "holds"), (0.1, "DOES NOT HOLD", "fails"),
                                                                        (0.3, "INCONCLUSIVE", "inconclusive")])
def test_claim_logic_on_hand_written_runs(study, tmp_path, monkeypatch, dpo_margin_on_min_length, verdict, outcome):
    monkeypatch.setattr(study, "prebuild", lambda tasks: None)  # hand-written runs need no task
    runs_of = write_claim4(study, tmp_path, dpo_margin_on_min_length)
    # the full length in responses: 3,840 on min_length, 64 per iteration (32 pairs): 60 iterations
    assert {r.iterations for (_, a), rs in runs_of.items() if a.task == "min_length" for r in rs} == {60}
    opts = dict(runs_of[4, study.arm("dpo", "min_length")][0].options)
    assert opts["learning-rate"] == "0.001" and opts["batch-size"] == "32"  # the tuned rate from the tuning file; 64 responses
    (summary,) = study.main(study.Args(claims=[4], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), tuning=str(tmp_path / "tuning.json")))
    assert summary["verdict"] == verdict
    assert [c["outcome"] for c in summary["checks"]] == ["holds", outcome]
    # dpo on bandit_r1: the last five of 50 training rows average 0.96 of the end margin; growth from row 1 (0.02 of it)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study.validate_report(report) == [] and report["seeds"] == [1, 2, 3, 4, 5] and report["tuning_seeds"] == [101, 102]
    assert report["claims"]["4"]["verdict"] == verdict and json.loads((tmp_path / "fig" / "report.json").read_text()) == report
    assert (tmp_path / "fig" / "claim4.png").stat().st_size > 10_000 and "## Claim 4: " + verdict in (tmp_path / "out" / "report.md").read_text()
    assert f"KL strengths from {tmp_path / 'tuning.json'} (tuning seeds [101, 102])" in (tmp_path / "out" / "report.md").read_text()


SPEED = {"online_dpo": 8.0, "online_ipo": 6.0, "best_of_n_neg": 5.0, "best_of_n": 4.0, "ppo": 3.0, "dpo": 2.0, "ipo": 2.0}


def synthetic_rows(study, run):
    """A run whose normalised gold rises as 1 - exp(-speed * responses / 1000): online DPO fastest, offline arms slowest,
    T = 2 helps every method and T = 8 hurts all but PPO, B = 64 beats B = 512 per gradient step; HyPO's KL stays low."""
    a, opts = run.arm, dict(run.options)
    per = study.responses_per_iteration(a.script, opts)
    speed = SPEED.get(a.script, 1.0) * (0.5 if "offline" in opts else 1.0) * {"2": 1.5, "4": 1.2, "8": 1.6 if a.script == "ppo" else 0.5}.get(
        opts.get("update-epochs"), 1.0) * 64 / per * (1 + 0.02 * run.seed)
    g0, best = (0.04, 1.0) if a.task in study.BANDITS else (-28.0, 0.0)
    rows = []
    for i in range(run.iterations + 1):
        f = 1 - math.exp(-speed * per * i / 1000)
        row = {"iteration": i, "samples": per * i, "eval/gold_reward": g0 + f * (best - g0), "eval/kl_ref": (1 if a.script == "hypo" else 10) * f}
        if i:
            row.update({"rewards/margins": f * (2.0 if a.script == "dpo" else 0.5), "logps/chosen": -30.0 - f * (a.script == "dpo")})
        rows.append(row)
    return rows


def test_every_claim_judges_and_plots_hand_written_runs(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "prebuild", lambda tasks: None)
    methods = study.OBJECTIVES + ["best_of_n --offline", "rwr --offline"]
    tuning = fake_tuning(study, tmp_path / "tuning.json", methods)
    runs_of = study.plan(list(study.claims().values()), [1, 2, 3], study.budgets_for(study.TASKS, tuning, False, None), tuning)
    for run in {r for rs in runs_of.values() for r in rs}:
        if run.arm.script == "mode_seeking":
            ms = load_script("mode_seeking", "benchmarks")
            (tmp_path / "out" / run.key).mkdir(parents=True)
            (tmp_path / "out" / run.key / "result.json").write_text(json.dumps(ms.run(ms.Args(figure=None))))
            (tmp_path / "out" / run.key / "done.json").write_text("{}")
        else:
            write_run(tmp_path / "out", run, synthetic_rows(study, run))
    summary = study.main(study.Args(seeds=[1, 2, 3], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), tuning=str(tmp_path / "tuning.json")))
    assert [len(s["checks"]) for s in summary] == [8, 6, 14, 2, 15, 7, 2, 2, 4]
    outcomes = {s["claim"]: [c["outcome"] for c in s["checks"]] for s in summary}
    # the synthetic world: on-policy beats offline everywhere by the same share of the room, so "the gap shrinks" is a tie
    assert outcomes[1] == ["holds", "inconclusive"] * 4 and outcomes[5] == ["holds"] * 15 and outcomes[6] == ["holds"] * 7
    assert outcomes[2] == ["holds", "inconclusive"] * 3 and outcomes[4] == ["holds", "holds"] and outcomes[9] == ["holds"] * 4
    assert outcomes[7] == ["holds", "inconclusive"] and outcomes[8] == ["holds", "holds"]
    assert outcomes[3] == (["holds", "inconclusive", "holds"] * 2 + ["holds"]) * 2  # offline Best-of-N is as fast as dpo and ipo here
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert study.validate_report(report) == [] and sorted(report["claims"], key=int) == [str(n) for n in range(1, 10)]
    assert all((tmp_path / "fig" / f"claim{n}.png").stat().st_size > 10_000 for n in range(1, 10))


def test_report_schema_catches_a_wrong_verdict_and_a_malformed_check(study):
    good = {"seeds": [1], "tuning_seeds": [], "wall_s": 1.0, "workers": 1,
            "claims": {"1": {"verdict": "HOLDS", "checks": [{"name": "n", "metric": "m", "mean_diff": 1.0, "ci90": [0.5, 1.5], "outcome": "holds"}]}}}
    assert study.validate_report(good) == []
    bad = json.loads(json.dumps(good))
    bad["claims"]["1"]["verdict"] = "DOES NOT HOLD"  # its checks hold or are malformed: nothing fails
    bad["claims"]["1"]["checks"].append({"name": "n", "outcome": "maybe"})
    del bad["workers"]
    assert len(study.validate_report(bad)) == 3


def test_missing_tuning_missing_script_and_failed_run(study, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"does not exist: run `python benchmarks/study.py --tune` first \(or pass --quick\)"):
        study.main(study.Args(claims=[4], tuning=str(tmp_path / "nothing.json"), out=str(tmp_path)))
    with pytest.raises(SystemExit, match=r"unknown claim ids \[12\]"):
        study.main(study.Args(claims=[1, 12]))
    monkeypatch.setattr(study, "prebuild", lambda tasks: None)
    write_claim4(study, tmp_path, 0.9)
    monkeypatch.setattr(study, "script_exists", lambda script: script != "hypo")
    fake_tuning(study, tmp_path / "tuning.json", ["dpo", "pref_ft", "hypo"])
    tuning = study.read_tuning(tmp_path / "tuning.json")
    runs_of = study.plan([study.claims()[4]], [1, 2, 3, 4, 5], study.budgets_for(study.TASKS, tuning, False, None), tuning)
    (tmp_path / "out" / runs_of[4, study.arm("dpo", "bandit_r1")][0].key / "done.json").unlink()  # not done: rerun, and it fails
    monkeypatch.setattr(study.Run, "command", lambda self: [sys.executable, "-c", "import sys; sys.exit('cannot train: boom')"])
    summary = study.main(study.Args(claims=[9, 4], out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), tuning=str(tmp_path / "tuning.json")))
    assert [s["verdict"] for s in summary] == ["MISSING", "FAILED"]
    assert "hypo" in summary[0]["numbers"][0] and "cannot train: boom" in "\n".join(summary[1]["numbers"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["claims"] == {}  # only judged claims enter report.json


# ------------------------------------------------------------------------------------- the real pipeline
def test_a_tiny_tuning_runs_the_real_scripts_and_writes_its_result(study, tmp_path):
    # two rates at the limits (extending the grid is test_the_tuning_grid_extends_past_edge_winners_within_limits's), grpo's KL strength
    args = study.Args(tune=True, tune_scripts=["dpo", "grpo"], tune_tasks=["bandit_r1"], tuning_seeds=[101], tune_rates=[1e-3, 3e-3],
                      tune_limits=(1e-3, 3e-3), max_iterations=2, workers=2, out=str(tmp_path), tuning=str(tmp_path / "not_written.json"))
    result = study.main(args)
    assert not (tmp_path / "not_written.json").exists()  # a partial tuning stays under OUT/tune
    assert json.loads((tmp_path / "tune" / "tuning.json").read_text()) == json.loads(json.dumps(result))
    for m in ("dpo", "grpo"):
        e = result["scripts"][m]["bandit_r1"]
        assert e["learning_rate"] in (1e-3, 3e-3) and set(e["scores"]) == {"0.001", "0.003"} and all(math.isfinite(s) for s in e["scores"].values())
        assert e["scores"][f"{e['learning_rate']:g}"] == max(e["scores"].values()) and e["edge"]  # the winner sits at a limit: flagged
    assert set(result["scripts"]["grpo"]["bandit_r1"]["beta_scores"]) == {"0.013", "0.04", "0.13"}  # KL strength at the winning rate
    b = result["budgets"]["bandit_r1"]
    assert b["samples"] <= 128 and b["samples"] % 64 == 0 and b["steps"] % 32 == 0  # capped runs: at most 2 iterations of 64


def test_quick_study_runs_its_pipeline_end_to_end_and_resumes(study, tmp_path, monkeypatch):
    args = study.Args(quick=True, claims=[4, 8, 9], max_iterations=2, out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), workers=2,
                      tuning=str(tmp_path / "none.json"))
    summary = study.main(args)
    assert [len(s["checks"]) for s in summary] == [2, 2, 4] and all(s["verdict"] in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE") for s in summary)
    assert all((tmp_path / "fig" / f"claim{n}.png").exists() for n in (4, 8, 9))
    assert len(list((tmp_path / "out").glob("*/done.json"))) == 8  # 7 runs and the toy: dpo on min_length serves claims 4 and 9
    assert study.validate_report(json.loads((tmp_path / "out" / "report.json").read_text())) == []
    monkeypatch.setattr(study.Launcher, "execute", lambda self, run: pytest.fail(f"{run.key} ran again"))
    assert [s["checks"] for s in study.main(args)] == [s["checks"] for s in summary]  # resumed: nothing rerun, the same result


def test_the_committed_report_passes_its_schema_and_covers_every_claim(study):
    """benchmarks/figures/report.json, from the final study run (issue 19): its verdicts follow from its checks."""
    report = json.loads((ROOT / "benchmarks" / "figures" / "report.json").read_text())
    assert study.validate_report(report) == []
    assert sorted(report["claims"], key=int) == [str(n) for n in range(1, 10)] and report["seeds"] == [1, 2, 3, 4, 5]
    assert not set(report["seeds"]) & set(report["tuning_seeds"])  # tuned on seeds it does not report
