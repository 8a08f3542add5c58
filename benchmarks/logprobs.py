"""Per-token log-probs from hidden states: time and peak memory of each implementation, side by side.

    OMP_NUM_THREADS=1 python benchmarks/logprobs.py            # CPU, fp32, d=256, N=4096
    python benchmarks/logprobs.py --cuda --dtype bf16         # on a GPU

Time: all implementations interleaved in one process (this machine drifts ~20% over minutes), the
median of `--repeats` rounds. Memory: each (implementation, V, mode) in a fresh subprocess, after one warm-up call, peak
minus the level before the call (VmHWM after a reset on CPU, max allocated on CUDA); inputs and the returned
gradients are included for every implementation alike. Ratios are against naive.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import fused_logprobs  # noqa: E402


def naive(h, w, y):
    return torch.log_softmax(h @ w.t(), dim=-1).gather(-1, y[:, None]).squeeze(-1)


def rowloop(h, w, y, rows=256):
    # TRL's selective_log_softmax idea: logits materialised once, logsumexp a slice at a time
    logits = h @ w.t()
    picked = logits.gather(-1, y[:, None]).squeeze(-1)
    lse = torch.cat([torch.logsumexp(logits[s : s + rows], dim=-1) for s in range(0, len(logits), rows)])
    return picked - lse


def builtin(chunk):
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    return lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none", options=opts)


IMPLS = {
    "naive": lambda: naive,
    "compile(naive)": lambda: torch.compile(naive),
    "rowloop (TRL)": lambda: rowloop,
    "builtin default": lambda: builtin(None),
    "builtin 256-row": lambda: builtin(256),
    "fused (cleanpref)": lambda: fused_logprobs,
}


def make_inputs(n, v, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    w = torch.randn(v, d, generator=g).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def run_once(fn, h, w, y, backward):
    if backward:
        h.grad = w.grad = None
        fn(h, w, y).sum().backward()
    else:
        with torch.no_grad():
            fn(h, w, y)


def peak_mib(impl, n, v, d, dtype, device, backward):
    """Runs in a fresh process: extra peak memory of one call, in MiB."""
    h, w, y = make_inputs(n, v, d, dtype, device)
    fn = IMPLS[impl]()
    run_once(fn, h, w, y, backward)  # load kernels / compile outside the measured call
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, h, w, y, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    h.grad = w.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
        f.write("5")
    base = proc_status_kib("VmRSS")
    run_once(fn, h, w, y, backward)
    return (proc_status_kib("VmHWM") - base) / 1024


def proc_status_kib(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 32000])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)  # impl, vocab, fwd|fwdbwd
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    device = "cuda" if a.cuda else "cpu"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a._memory:
        impl, v, mode = a._memory
        print(json.dumps(peak_mib(impl, a.n, int(v), a.d, dtype, device, mode == "fwdbwd")))
        return

    print(f"N={a.n} d={a.d} {a.dtype} {device} threads={torch.get_num_threads()} torch {torch.__version__}")
    for v in a.vocab:
        for mode in ("fwdbwd", "fwd"):
            inputs = make_inputs(a.n, v, a.d, dtype, device)
            fns = {k: IMPLS[k]() for k in a.impls}
            times = {k: [] for k in fns}
            for k, fn in fns.items():  # warm-up (and compile)
                run_once(fn, *inputs, mode == "fwdbwd")
            for _ in range(a.repeats):
                for k, fn in fns.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    run_once(fn, *inputs, mode == "fwdbwd")
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t)
            mem = {}
            for k in fns:
                cmd = [sys.executable, __file__, "--n", str(a.n), "--d", str(a.d), "--dtype", a.dtype, "--_memory", k, str(v), mode]
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave RSS at once
                out = subprocess.run(cmd + (["--cuda"] if a.cuda else []), capture_output=True, text=True, check=True, env=env)
                mem[k] = json.loads(out.stdout.strip().splitlines()[-1])
            t0, m0 = statistics.median(times["naive"]), mem["naive"]
            print(f"\nV={v} {'fwd+bwd' if mode == 'fwdbwd' else 'forward only (no_grad)'}")
            print("| implementation | time ms | time / naive | peak MiB | memory / naive |\n|---|---|---|---|---|")
            for k in fns:
                t = statistics.median(times[k])
                print(f"| {k} | {1000 * t:.1f} | {t / t0:.2f}x | {mem[k]:.1f} | {mem[k] / m0:.3f}x |")
    print(f"\nreproduce: OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/logprobs.py" + (" --cuda" if a.cuda else "") + (f" --dtype {a.dtype}" if a.dtype != "fp32" else ""))


if __name__ == "__main__":
    main()
