"""Past one device (issue 13): torchrun with 2 CPU processes (gloo) against 1 process, FSDP2, --bf16, --resume.

The 2-process runs use `python -m torch.distributed.run` (torchrun, shipped with torch) with one thread per process.
B and M are global, so a 2-process run does the same optimisation as a 1-process run up to float reduction order.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, metrics_of, run, train

# small sizes, and lr 1e-3: the tolerances below were measured there (the tuned bandit rates, up to 3e-2, amplify
# float reduction-order noise between 1 and 2 processes past them within 4 iterations)
SIZES = ["--batch-size", "16", "--minibatch-size", "4", "--num-eval-prompts", "16", "--learning-rate", "1e-3"]


def torchrun(script, cwd, *args, nproc=2):
    """algos/{script}.py on `nproc` CPU processes (gloo), one thread each; the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "algos" / f"{script}.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def assert_rows_close(two, one, rel=1e-4):
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for k in a:
            if k != "time_s":
                assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-5), (a["iteration"], k)


@pytest.mark.parametrize("script", ["dpo", "online_dpo", "simpo", "orpo", "kto"])  # the forks (docs/fork.md) as their siblings
def test_two_processes_match_one(script, tmp_path):
    """Same global B, M and seed: the same train/loss sequence (and every other metric) on 2 processes as on 1.
    online_dpo: every rank draws the uniforms of the whole batch and samples its share of the rows, in lockstep, so
    the completions are the 1-process run's; they could differ only where a float difference in the forward moves a
    cumulative probability across a uniform (never seen here: the proxy rewards are equal)."""
    args = ["--task", "bandit_r1", "--num-iterations", "4", "--eval-every", "2", *SIZES]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _, one = train(script, tmp_path / "one", *args[1:2], *args[2:])
    out = torchrun(script, tmp_path / "two", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    saved, two = metrics_of(tmp_path / "two", script, "bandit_r1")
    assert saved["world_size"] == 2 and saved["batch_size"] == 16 and saved["minibatch_size"] == 4
    assert len([r for r in two if "train/loss" in r]) == 4
    assert_rows_close(two, one)
    (run_dir,) = (tmp_path / "two" / "runs").iterdir()  # rank 0 alone writes runs/<run>/
    assert sorted(p.name for p in run_dir.iterdir()) == ["args.json", "metrics.jsonl"]
    assert out.stdout.count("iter    0 samples") == 1  # rank 1 prints nothing


def test_world_size_must_divide_sizes(tmp_path):
    out = torchrun("dpo", tmp_path, "--task", "bandit_r1", "--batch-size", "12", "--minibatch-size", "3")
    assert out.returncode != 0
    assert "--minibatch-size / the number of processes (M is global): 3 is not divisible by 2" in out.stderr
    assert f'File "{ROOT / "algos"}' not in out.stderr  # a one-line error from the script, no traceback of it (torchrun adds its summary)
    assert not (tmp_path / "runs").exists()


KILLER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import load_script
import tyro
mod = load_script({script!r})
real, calls = torch.save, [0]
def dying_save(obj, f, *a, **k):  # the process dies while writing its {nth}th checkpoint, after the model files
    calls[0] += 1
    if calls[0] == {nth}:
        os._exit(9)
    return real(obj, f, *a, **k)
torch.save = dying_save
mod.main(tyro.cli(mod.Args))
"""


def run_killed(script, tmp_path, *args):
    """`script` with `args` in tmp_path/killed, killed (exit code 9) while it writes its 2nd checkpoint."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(tests=str(ROOT / "tests"), script=script, nth=2))
    out = subprocess.run([sys.executable, str(killer), *args], cwd=tmp_path / "killed", capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 9, out.stderr[-3000:]


@pytest.mark.parametrize("script", ["dpo", "online_dpo", "ppo", "simpo", "orpo", "kto"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(script, tmp_path):
    """A run killed while saving its second checkpoint (iteration 8; rows up to 7 written) is resumed from the first
    (iteration 4): rows 5-7 are dropped and recomputed, and every metric equals the uninterrupted run's
    bit for bit (CPU). Covers the policy, Adam, the RNGs and each family's own state (offline cursor; samplers;
    PPO's value model, its optimiser and the KL controller)."""
    args = ["--task", "bandit_r1", "--num-iterations", "10", "--eval-every", "4", "--save-model", *SIZES]
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    _, whole = train(script, tmp_path / "whole", *args[1:2], *args[2:])
    run_killed(script, tmp_path, *args)
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    assert [json.loads(line)["iteration"] for line in open(run_dir / "metrics.jsonl")] == list(range(8))
    assert os.readlink(run_dir / "model") == "checkpoint-000004"  # the half-written checkpoint 8 was never swapped in
    resumed = run(script, tmp_path / "killed", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    _, rows = metrics_of(tmp_path / "killed", script, "bandit_r1")
    assert without_time(rows) == without_time(whole)
    assert os.readlink(run_dir / "model") == "checkpoint-000010" and not list(run_dir.glob(".checkpoint-*"))


def test_resume_clears_a_stale_link_drops_a_cut_line_and_extends_the_run(tmp_path):
    """A kill can leave runs/<run>/.model.tmp (between save_checkpoint's symlink and its rename) and a last metrics line cut
    short (a full disk): --resume clears the first, drops the second with a note, and --num-iterations 4 extends a
    2-iteration run to exactly the uninterrupted 4-iteration run. Other flags given with --resume are refused."""
    args = ["--task", "bandit_r1", "--eval-every", "2", "--save-model", *SIZES]
    for d in ("whole", "short"):
        (tmp_path / d).mkdir()
    _, whole = train("dpo", tmp_path / "whole", "bandit_r1", "--num-iterations", "4", *args[2:])
    train("dpo", tmp_path / "short", "bandit_r1", "--num-iterations", "2", *args[2:])
    (run_dir,) = (tmp_path / "short" / "runs").iterdir()
    os.symlink("checkpoint-000002", run_dir / ".model.tmp")
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])
    refused = run("dpo", tmp_path / "short", "--resume", str(run_dir), "--num-iterations", "4", "--batch-size", "8")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr[-2000:]
    assert "--batch-size 8 differs from the run's 16" in refused.stderr
    out = run("dpo", tmp_path / "short", "--resume", str(run_dir), "--num-iterations", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"[cleanpref] {metrics}: dropped its last line, cut short" in out.stdout
    _, rows = metrics_of(tmp_path / "short", "dpo", "bandit_r1")
    assert without_time(rows) == without_time(whole)
    assert os.readlink(run_dir / "model") == "checkpoint-000004" and not os.path.lexists(run_dir / ".model.tmp")
    assert json.loads((run_dir / "args.json").read_text())["num_iterations"] == 4


@pytest.mark.parametrize("script", ["sft", "reward_model"])
def test_sft_and_reward_model_resume_after_a_kill_equals_an_uninterrupted_run(script, local_pythia, tmp_path):
    """12 steps, a checkpoint every 4: killed while saving the second (step 8; rows up to 7 written), resumed from step 4,
    the per-step rows, the per-epoch losses (and held-out accuracy) and the saved weights equal the uninterrupted run's
    bit for bit (CPU): AdamW, the learning-rate schedule, the data order and the epoch's running sums all resume."""
    from safetensors.torch import load_file

    args = {"sft": ["--dataset", "demos.jsonl", "--response-column", "output", "--learning-rate", "1e-2", "--minibatch-size", "8"],
            "reward_model": ["--dataset", "prefs.jsonl", "--learning-rate", "3e-3", "--eval-fraction", "0.25", "--minibatch-size", "6"]}[script]
    args += ["--model", str(local_pythia[0]), "--num-epochs", "2", "--save-every", "4"]  # 48 demos (36 training pairs): 6 steps an epoch
    for d in ("whole", "killed"):
        (tmp_path / d).mkdir()
        demos_and_prefs(tmp_path / d)
    out = run(script, tmp_path / "whole", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    run_killed(script, tmp_path, *args)
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    assert [json.loads(line)["iteration"] for line in open(run_dir / "metrics.jsonl")] == list(range(1, 8))
    assert os.readlink(run_dir / "model") == "checkpoint-000004" and not (run_dir / "metrics.json").exists()
    out = run(script, tmp_path / "killed", "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    (whole,) = (tmp_path / "whole" / "runs").iterdir()
    for name in ("metrics.jsonl", "metrics.json"):
        assert (run_dir / name).read_text() == (whole / name).read_text(), name
    a, b = (load_file(d / "model" / "model.safetensors") for d in (whole, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    per_epoch = next(iter(json.loads((whole / "metrics.json").read_text()).values()))
    assert len(per_epoch) == 2 and per_epoch[1] < per_epoch[0]  # two epochs, and it learned: not a comparison of no-ops


def test_fsdp_two_processes(tmp_path):
    """--fsdp on 2 processes: the same losses as 1 process, and the checkpoint gathered from the shards reloads with
    from_pretrained to the 1-process run's weights."""
    from transformers import AutoModelForCausalLM

    args = ["--task", "bandit_r1", "--num-iterations", "2", "--eval-every", "2", "--save-model", *SIZES]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _, one = train("dpo", tmp_path / "one", *args[1:2], *args[2:])
    out = torchrun("dpo", tmp_path / "two", *args, "--fsdp")
    assert out.returncode == 0, out.stderr[-3000:]
    saved, two = metrics_of(tmp_path / "two", "dpo", "bandit_r1")
    assert saved["fsdp"] and saved["world_size"] == 2
    assert_rows_close(two, one)
    (a,), (b,) = ((tmp_path / d / "runs").iterdir() for d in ("one", "two"))
    ref, sharded = (AutoModelForCausalLM.from_pretrained(d / "model").state_dict() for d in (a, b))
    assert ref.keys() == sharded.keys()
    for k in ref:  # 2 Adam steps of lr 1e-3 move weights by ~2e-3; float reduction order moved a few by up to 1.6e-5 (measured)
        torch.testing.assert_close(sharded[k], ref[k], rtol=0, atol=1e-4)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    """The CPU twin of --bf16 --cuda: forward passes under bf16 autocast (the numbers move off fp32's: autocast is on),
    fp32 weights and Adam (they stay close: measured train/loss 0.67774 vs 0.67777, logps/chosen -38.469 vs -38.470)."""
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        (tmp_path / name).mkdir()
        _, runs[name] = train("dpo", tmp_path / name, "bandit_r1", "--num-iterations", "2", "--eval-every", "1", *extra, *SIZES)
    for key in ("train/loss", "logps/chosen"):
        fp32, bf16 = (runs[n][-1][key] for n in ("fp32", "bf16"))
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-3), (key, fp32, bf16)


def demos_and_prefs(cwd):
    """test_algos's demonstrations (demos.jsonl) and length preferences (prefs.jsonl) for sft.py and reward_model.py."""
    from conftest import INSTRUCTIONS

    words = "one two three four five six seven eight nine".split()
    demos = [{"instruction": INSTRUCTIONS[i % 6], "input": "", "output": " ".join(words[: 1 + i % 3])} for i in range(48)]
    pairs = [{"prompt": d["instruction"], "chosen": words[i % 3], "rejected": " ".join(words[: 4 + i % 5])} for i, d in enumerate(demos)]
    (cwd / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    (cwd / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))


@pytest.mark.parametrize("script", ["sft", "reward_model"])
def test_sft_and_reward_model_two_processes_match_one(script, local_pythia, tmp_path):
    """The same global --minibatch-size and seed: the same per-epoch losses (and held-out accuracy) on 2 processes as on 1,
    and rank 0 alone writes and prints. reward_model.py runs its 2 processes with --fsdp: forwards in lockstep over
    shards of different lengths, and the full state dict gathered for save_pretrained (weights checked against 1 process)."""
    model_dir, _, _ = local_pythia
    args = {"sft": ["--dataset", "demos.jsonl", "--response-column", "output", "--learning-rate", "1e-2", "--num-epochs", "2"],
            "reward_model": ["--dataset", "prefs.jsonl", "--learning-rate", "3e-3", "--num-epochs", "2", "--eval-fraction", "0.25"]}[script]
    args += ["--model", str(model_dir), "--minibatch-size", "6"]  # 48 (36 for the reward model) rows: a last minibatch of 6 (of 3 per rank)
    two_args = args + ["--fsdp"] * (script == "reward_model")
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        demos_and_prefs(tmp_path / d)
    out = run(script, tmp_path / "one", *args)
    assert out.returncode == 0, out.stderr[-3000:]
    out = torchrun(script, tmp_path / "two", *two_args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("saved runs/") == 1  # rank 1 prints nothing
    (one,), (two,) = ((tmp_path / d / "runs").iterdir() for d in ("one", "two"))  # rank 0 alone writes, to rank 0's directory
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith("checkpoint-")) == ["args.json", "metrics.json", "metrics.jsonl", "model"]
    assert json.loads((two / "args.json").read_text())["world_size"] == 2
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:  # measured: relative differences 1e-8 (sft, DDP) and 8e-8 (reward model, FSDP2)
        assert b[k] == pytest.approx(a[k], rel=1e-4), k
    assert a[next(iter(a))][-1] < 0.8 * a[next(iter(a))][0]  # it learned: the comparison is not between two no-ops
    if script == "reward_model":
        from transformers import AutoModelForSequenceClassification

        ref, sharded = (AutoModelForSequenceClassification.from_pretrained(d / "model").state_dict() for d in (one, two))
        assert ref.keys() == sharded.keys()
        for k in ref.keys() - {"gpt_neox.final_layer_norm.bias"}:  # that bias shifts every reward alike: the loss ignores it,
            torch.testing.assert_close(sharded[k], ref[k], rtol=0, atol=1e-4)  # and Adam turns its float-noise gradient into steps


def test_sft_world_size_must_divide_the_minibatch(local_pythia, tmp_path):
    demos_and_prefs(tmp_path)
    out = torchrun("sft", tmp_path, "--model", str(local_pythia[0]), "--dataset", "demos.jsonl", "--minibatch-size", "7")
    assert out.returncode != 0
    assert "--minibatch-size / the number of processes (M is global): 7 is not divisible by 2" in out.stderr
    assert not (tmp_path / "runs").exists()
