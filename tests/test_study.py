"""benchmarks/: the mode-seeking toy (claim 8) and the study's launcher and claim logic."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from conftest import ROOT


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mode_seeking_reverse_kl_concentrates_faster_but_starts_slowly_from_zero():
    ms = load_benchmark("mode_seeking")
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


def write_run(out, run, rows):
    """A finished run as the launcher leaves it: done.json, and the script's runs/<name>/metrics.jsonl."""
    d = out / run.key / "runs" / "x"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / run.key / "done.json").write_text("{}")


def fake_rows(start, end, margin_end, iterations=4):
    """Metrics of a run whose gold reward goes linearly start -> end and whose training margin grows to margin_end."""
    rows = []
    for i in range(iterations + 1):
        f = i / iterations
        row = {"iteration": i, "samples": 64 * i, "eval/gold_reward": start + f * (end - start), "eval/kl_ref": 3.0 * f}
        if i:
            row.update({"train/loss": 0.5, "rewards/margins": f * margin_end, "logps/chosen": -30.0 - f})
        rows.append(row)
    return rows


@pytest.fixture
def study(monkeypatch):
    module = load_benchmark("study")
    monkeypatch.setattr(module, "prebuild", lambda tasks: None)  # hand-written runs need no task
    return module


def claim_runs(study, number, seeds=(1, 2)):
    c = study.claims(False)[number]
    return [(a, study.make_run(a, s, c.budget(a) if c.budget else study.equal_budget(a.task, False))) for a in c.arms for s in seeds]


@pytest.mark.parametrize("dpo_margin_on_min_length,verdict", [(0.9, "HOLDS"), (0.1, "DOES NOT HOLD")])
def test_claim_logic_on_hand_written_runs(study, tmp_path, dpo_margin_on_min_length, verdict):
    for a, run in claim_runs(study, 4):
        margin = {"pref_ft": 0.3, "dpo": dpo_margin_on_min_length if a.task == "min_length" else 0.8}[a.script]
        write_run(tmp_path, run, fake_rows(0.0, 0.5, margin + 0.01 * run.seed))
    (summary,) = study.main(study.Args(claims=[4], seeds=2, out=str(tmp_path), figures=str(tmp_path / "fig")))
    assert summary["verdict"] == verdict
    assert [ok for _, ok in summary["checks"]] == [True, verdict == "HOLDS"]
    # dpo on bandit_r1: the last (up to) five training rows average 0.625 of the end margin: 0.625 * (0.81, 0.82)
    assert "dpo      rewards/margins 0.509 +- 0.0044" in "\n".join(summary["numbers"])
    assert (tmp_path / "fig" / "claim4.png").stat().st_size > 10_000 and (tmp_path / "report.md").exists()


def test_a_claim_with_a_missing_script_is_missing_and_a_failed_run_fails(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "script_exists", lambda script: script != "hypo")
    for a, run in claim_runs(study, 4):
        write_run(tmp_path, run, fake_rows(0.0, 0.5, 0.5))
    (_, bad), *_ = claim_runs(study, 4)
    (tmp_path / bad.key / "done.json").unlink()  # not done: the launcher reruns it, with an option the script rejects
    monkeypatch.setattr(study.Run, "command", lambda self: [sys.executable, "-c", "import sys; sys.exit('cannot train: boom')"])
    summary = study.main(study.Args(claims=[9, 4], seeds=2, out=str(tmp_path), figures=str(tmp_path / "fig")))
    assert [s["verdict"] for s in summary] == ["MISSING", "FAILED"]
    assert "hypo" in summary[0]["numbers"][0] and "cannot train: boom" in "\n".join(summary[1]["numbers"])


def test_unknown_claims_and_the_tuning_rule(study):
    with pytest.raises(SystemExit, match=r"unknown claim ids \[12\]"):
        study.main(study.Args(claims=[1, 12]))
    assert study.pick_lr({1e-4: -3.0, 3e-4: -1.0, 1e-3: -1.0 + 1e-8, 3e-3: float("nan")}) == 3e-4  # a tie goes to the smaller rate
    rows = fake_rows(-30.0, -10.0, 0.5, iterations=6)  # evaluations -30, ..., -13.33, -10
    assert study.final(rows) == pytest.approx((-10 - 40 / 3) / 2) and study.final(rows, "rewards/margins") == pytest.approx(0.5 * 4 / 6)


def test_a_tiny_study_runs_the_real_scripts_writes_its_figure_and_resumes(tmp_path, monkeypatch):
    study = load_benchmark("study")
    args = study.Args(claims=[4], seeds=1, max_iterations=2, out=str(tmp_path / "out"), figures=str(tmp_path / "fig"), workers=2)
    (summary,) = study.main(args)
    assert summary["verdict"] in ("HOLDS", "DOES NOT HOLD") and len(summary["checks"]) == 2
    assert (tmp_path / "fig" / "claim4.png").exists() and len(list((tmp_path / "out").glob("*/done.json"))) == 4
    monkeypatch.setattr(study.Launcher, "execute", lambda self, run: pytest.fail(f"{run.key} ran again"))
    assert study.main(args)[0]["checks"] == summary["checks"]  # resumed: nothing rerun, the same result
