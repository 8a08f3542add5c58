"""benchmarks/ on a CPU: gpu_check.py (its arguments, its table, the one-line refusal without CUDA, a dry run of its
parts) and decode_step.py (its written-out decode step equals the model's forward)."""

import subprocess
import sys

import pytest
from conftest import ROOT, load_script


def gpu_check():
    return load_script("gpu_check", "benchmarks")


def test_arguments_and_table():
    gc = gpu_check()
    a = gc.parse_args([])
    assert a.parts == list(gc.PARTS) and a.device == "cuda" and not a.tiny
    a = gc.parse_args(["--parts", "logprobs", "fsdp", "--device", "cpu", "--tiny", "--repeats", "2"])
    assert (a.parts, a.device, a.tiny, a.repeats) == (["logprobs", "fsdp"], "cpu", True, 2)
    with pytest.raises(SystemExit):
        gc.parse_args(["--parts", "nonsense"])
    assert gc.table([("generate", "b=64", "10 tok/s", "2.00x")]).splitlines() == [
        "| part | setting | result | relative |", "|---|---|---|---|", "| generate | b=64 | 10 tok/s | 2.00x |"]


def test_without_cuda_one_line_and_help():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "no CUDA device" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--tiny" in out.stdout and "llama100m" in out.stdout


def test_dry_run_of_the_parts_on_cpu(capsys, monkeypatch):
    """--device cpu --tiny: the same code paths as on a GPU at toy sizes (the torchrun part is left to tests/test_scale.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = gpu_check().main(["--device", "cpu", "--tiny", "--repeats", "1", "--parts", "logprobs", "generate", "llama100m", "main"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and not line.startswith("| part ")]
    assert rc == 0, rows
    parts = [r.split(" | ")[0][2:] for r in rows]
    assert parts.count("logprobs") == 12 and parts.count("generate") == 2 and parts.count("llama100m") == 4 and parts.count("main job") == 2
    assert not any("failed" in r or "FAILED" in r for r in rows)
    assert any("--bf16" in r and "final gold" in r for r in rows)


def test_decode_step_written_out_equals_the_forward(capsys):
    """The written-out Llama decode step that docs/benchmarks.md measures computes the eager forward's logits, bitwise, and
    its table has every row (the compiled variant is left out: a minute of inductor)."""
    load_script("decode_step", "benchmarks").main(["--batch", "8", "--steps", "3", "--rounds", "1"])
    rows = {r.split(" | ")[0][2:]: r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| step ")}
    assert list(rows) == ["eager forward", "written out", "matmuls alone", "attention alone"]
    assert rows["written out"].endswith("| bitwise equal |") and rows["eager forward"].endswith("| 1.00x | bitwise equal |")
