"""What a CPU cannot show, in one command and one table, on one CUDA GPU (about 6-8 minutes on an H100).

    python benchmarks/gpu_check.py                                  # every part, on cuda:0
    python benchmarks/gpu_check.py --parts logprobs generate       # some parts
    python benchmarks/gpu_check.py --device cpu --tiny              # a dry run: every part at toy sizes, on CPU

Parts (each a few rows of the table; a part that fails prints its error in its row and the others go on):
- tasks: builds min_length and skew_length on first use (cached under $CLEANPREF_CACHE), timed apart.
- logprobs: `common.fused_logprobs` against the naive log-softmax and `F.linear_cross_entropy` (default options),
  forward + backward: time and peak memory beyond the inputs, fp32 and bf16, V = 32k and 128k (N = 4096 rows, d = 2048).
- generate: `common.generate` against `model.generate` (tokens/s, batch 64, benchmarks/generate.py's workloads), and on
  min_length `compile=True` too (static cache, compiled decode step with CUDA graphs; the first call compiles, untimed).
- main: the main job, `online_dpo.py --task skew_length` with `--cuda` and with `--cuda --bf16`: wall time, final gold.
- fsdp: `torchrun --nproc-per-node 1 online_dpo.py --cuda --fsdp --save-model` (FSDP2 on one process, nccl), 10 iterations.
- llama100m: one `online_dpo.py` iteration (sampling 32 prompts x 2 completions of 128 tokens, reward model, reference,
  DPO step) and one `dpo.py` step (64 pairs), the scripts' own functions, on a ~106M-parameter Llama built from a config
  (random weights, no download), fp32 and bf16 autocast (`common.wrap`, as --bf16 does).

`--tiny` runs the same code paths at toy sizes (CUDA or CPU) so that a change can be checked without a GPU;
tests/test_benchmarks.py runs it on CPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tasks", "logprobs", "generate", "main", "fsdp", "llama100m")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default: all)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run (with --tiny), no GPU numbers")
    p.add_argument("--tiny", action="store_true", help="toy sizes: checks the code paths in seconds, measures nothing of interest")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (medians)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def table(rows):
    """Markdown table of (part, setting, result, relative) rows."""
    lines = ["| part | setting | result | relative |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(str(c) for c in row)} |" for row in rows])


class Table:
    """Rows printed as they come (one table on stdout, its header first), kept for --json."""

    def __init__(self):
        self.rows = []
        print(table([]), flush=True)

    def add(self, part, setting, result, relative=""):
        self.rows.append((part, setting, result, relative))
        print(table([self.rows[-1]]).splitlines()[-1], flush=True)


def timed(fn, repeats, cuda):
    """Median seconds of `repeats` calls of fn (after one untimed call)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_mib(fn, cuda):
    """Peak CUDA memory of one call beyond what was allocated before it, in MiB (None on CPU)."""
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def part_tasks(a, out):
    from tasks import make_task

    for name in ("min_length",) if a.tiny else ("min_length", "skew_length"):
        t = time.perf_counter()
        make_task(name)
        out.add("tasks", f"make_task({name!r})", f"{time.perf_counter() - t:.1f} s", "build on first use, then cached")


def part_logprobs(a, out):
    import torch

    from common import fused_logprobs
    from logprobs import builtin, make_inputs, naive, run_once

    cuda = a.device == "cuda"
    n, d, vocabs = (64, 16, (256, 1024)) if a.tiny else (4096, 2048, (32768, 131072))
    impls = {"naive log_softmax": naive, "F.linear_cross_entropy": builtin(None), "common.fused_logprobs": fused_logprobs}
    for dtype in (torch.float32, torch.bfloat16):
        for v in vocabs:
            h, w, y = make_inputs(n, v, d, dtype, a.device)
            res = {}
            for name, fn in impls.items():
                call = lambda: run_once(fn, h, w, y, True)  # noqa: E731
                try:
                    t = timed(call, a.repeats, cuda)
                    h.grad = w.grad = None  # the peak is measured from the inputs alone, gradients included in it
                    res[name] = (t, peak_mib(call, cuda))
                except Exception as err:  # e.g. out of memory: the row says so
                    out.add("logprobs", f"{str(dtype)[6:]} V={v} {name}", f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                    continue
                t, m = res[name]
                ref = res.get("naive log_softmax")
                rel = f"{t / ref[0]:.2f}x time" + (f", {m / ref[1]:.3f}x memory" if m is not None else "") + " of naive" if ref else ""
                out.add("logprobs", f"{str(dtype)[6:]} V={v} N={n} d={d} {name} fwd+bwd",
                        f"{t * 1000:.2f} ms" + (f", {m:.0f} MiB" if m is not None else ""), rel)
            del h, w, y
            if cuda:
                torch.cuda.empty_cache()


def part_generate(a, out):
    import torch

    from generate import queries, sample_rates, workloads

    batch = 4 if a.tiny else 64
    for name, model, prompts, pad, eos, new, c in workloads(torch.device(a.device), a.tiny):
        if c > 1:
            continue
        compile = a.device == "cuda" and name.startswith("min_length")  # one compile (~1 min); on CPU it takes a minute too
        rates, err, _ = sample_rates(model, queries(prompts, batch, c, pad, a.device), pad, eos, new, a.repeats, compile)
        hf = rates["model.generate"]
        out.add("generate", f"{name}, batch {batch}: model.generate", f"{hf:.0f} tok/s")
        out.add("generate", f"{name}, batch {batch}: common.generate", f"{rates['helper']:.0f} tok/s",
                f"{rates['helper'] / hf:.2f}x model.generate; max abs(sampling logp - recompute) {err:.1e}")
        if compile:
            out.add("generate", f"{name}, batch {batch}: common.generate compile=True", f"{rates['helper compile=True']:.0f} tok/s",
                    f"{rates['helper compile=True'] / hf:.2f}x model.generate")


def run_script(a, script, args, torchrun=False):
    """(wall seconds, last metrics row) of algos/<script>.py run to completion in a fresh directory."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else [sys.executable]
    with tempfile.TemporaryDirectory() as cwd:
        t = time.perf_counter()
        res = subprocess.run([*launcher, str(ROOT / "algos" / f"{script}.py"), *args], cwd=cwd, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        wall = time.perf_counter() - t
        if res.returncode:
            raise RuntimeError(f"{script}.py {' '.join(args)} exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
        (run_dir,) = (Path(cwd) / "runs").iterdir()
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return wall, rows[-1]


def _job_args(a, *extra):
    small = ["--num-iterations", "2", "--eval-every", "1", "--batch-size", "8", "--minibatch-size", "4", "--num-eval-prompts", "8"]
    return (["--task", "min_length", *small] if a.tiny else ["--task", "skew_length"]) + (["--cuda"] if a.device == "cuda" else []) + list(extra)


def part_main(a, out):
    for extra in ([], ["--bf16"]):
        args = _job_args(a, *extra)
        wall, last = run_script(a, "online_dpo", args)
        out.add("main job", f"online_dpo.py {' '.join(args)}", f"{wall:.0f} s wall, final gold {last['eval/gold_reward']:.2f}",
                f"{last['iteration']} iterations, {last['samples']} samples")


def part_fsdp(a, out):
    args = _job_args(a, "--fsdp", "--save-model", *([] if a.tiny else ["--num-iterations", "10", "--eval-every", "5"]))
    wall, last = run_script(a, "online_dpo", args, torchrun=True)
    out.add("fsdp", f"torchrun --nproc-per-node 1 online_dpo.py {' '.join(args)}", f"{wall:.0f} s wall, final gold {last['eval/gold_reward']:.2f}",
            f"{last['iteration']} iterations; the checkpoint gathered from the shards")


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_llama100m(a, out):
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from algos.reward_model import reward_scores
    from common import generate, pad_rows, wrap

    od, dpo = _script("online_dpo"), _script("dpo")
    cuda = a.device == "cuda"
    size = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) if a.tiny else \
        dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12)
    cfg = dict(size, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    task = SimpleNamespace(pad_token_id=0, eos_token_id=1, temperature=1.0)
    prompts_n, new, pairs_n = (4, 8, 8) if a.tiny else (32, 128, 64)
    g = torch.Generator().manual_seed(0)

    def rand_rows(n, lo, hi):
        return [torch.randint(2, size["vocab_size"], (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]

    prompts = pad_rows(rand_rows(prompts_n, 16, 65), 0, left=True, device=a.device)
    pair_prompts = pad_rows(rand_rows(pairs_n, 16, 65), 0, left=True, device=a.device)
    chosen, rejected = (pad_rows(rand_rows(pairs_n, 8, new + 1), 0, left=False, device=a.device) for _ in range(2))
    for bf16 in (False, True):
        torch.manual_seed(0)
        models = [LlamaForCausalLM(LlamaConfig(**cfg)) for _ in range(2)] + [LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1))]
        policy, ref, rm = (wrap(m.to(a.device).eval(), SimpleNamespace(bf16=bf16, fsdp=False)) for m in models)
        ref.requires_grad_(False)
        rm.requires_grad_(False)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-12)
        sampler = torch.Generator(a.device).manual_seed(0)
        n_params = sum(p.numel() for p in policy.parameters())

        def train(module, q, c, r, ref_logps):
            c_logps, r_logps = module.sequence_logprobs(policy, task, q, c, r)
            losses, _, _ = module.dpo_loss(c_logps, r_logps, ref_logps[:, 0], ref_logps[:, 1], 0.1)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()

        def online_iteration():
            queries = prompts.repeat_interleave(2, dim=0)
            with torch.no_grad():
                responses, _ = generate(policy, queries, 0, 1, new, 1.0, sampler)
                scores = reward_scores(rm, queries, responses, 0).view(-1, 2)
                rows = torch.arange(len(prompts), device=a.device)
                pairs = responses.view(len(prompts), 2, -1)
                c, r = pairs[rows, scores.argmax(1)], pairs[rows, scores.argmin(1)]
                ref_logps = torch.stack(od.sequence_logprobs(ref, task, prompts, c, r), 1)
            train(od, prompts, c, r, ref_logps)

        with torch.no_grad():  # dpo.py precomputes the reference log-probs once, before training
            pair_ref = torch.stack(dpo.sequence_logprobs(ref, task, pair_prompts, chosen, rejected), 1)

        def dpo_step():
            train(dpo, pair_prompts, chosen, rejected, pair_ref)

        kind = "bf16 autocast" if bf16 else "fp32"
        t = timed(online_iteration, max(1, a.repeats // 2), cuda)
        out.add("llama100m", f"{n_params / 1e6:.3g}M Llama {kind}: online_dpo iteration ({prompts_n} prompts x 2, {new} new tokens)",
                f"{t * 1000:.0f} ms", f"peak {peak_mib(online_iteration, cuda) or 0:.0f} MiB" if cuda else "")
        t = timed(dpo_step, a.repeats, cuda)
        out.add("llama100m", f"{n_params / 1e6:.3g}M Llama {kind}: dpo step ({pairs_n} pairs)",
                f"{t * 1000:.0f} ms", f"peak {peak_mib(dpo_step, cuda) or 0:.0f} MiB" if cuda else "")
        del policy, ref, rm, opt, models, pair_ref
        if cuda:
            torch.cuda.empty_cache()


def main(argv=None):
    a = parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU, "
                         "or try the code paths with --device cpu --tiny")
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")) if a.device == "cpu" else torch.get_num_threads())
    name = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}{', tiny sizes (a dry run)' if a.tiny else ''}\n", flush=True)
    out, start = Table(), time.perf_counter()
    for part in a.parts:
        t = time.perf_counter()
        try:
            globals()[f"part_{part}"](a, out)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            out.add(part, "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
        print(f"<!-- {part}: {time.perf_counter() - t:.0f} s -->", file=sys.stderr, flush=True)
    print(f"\n{len(out.rows)} rows in {time.perf_counter() - start:.0f} s on {name}; reproduce: python benchmarks/gpu_check.py"
          + "".join(f" --{k} {v}" for k, v in (("device", a.device),) if v != "cuda") + (" --tiny" if a.tiny else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(out.rows, indent=1))
    failed = [r for r in out.rows if r[1] == "FAILED" or str(r[2]).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
