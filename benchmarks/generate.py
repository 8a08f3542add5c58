"""Sampling throughput: cleanpref's `common.generate` vs Hugging Face `model.generate`, side by side.

    OMP_NUM_THREADS=1 python benchmarks/generate.py
    OMP_NUM_THREADS=1 python benchmarks/generate.py --baseline ../before   # also another checkout's generate, interleaved
    python benchmarks/generate.py --cuda --compile          # on a GPU, with the static-cache compiled decode step too

Three workloads, each at batch 16 and 64, temperature 1, no top-k/top-p:
- `min_length pi_ref`: the task's reference policy (2-layer Llama, 128 wide) on its train prompts, up to
  64 new tokens, stopping at EOS (responses average ~30 tokens, ~5% run to the limit, so a batch of 64
  nearly always runs all 64 steps); `x2` gives each prompt twice in a row, as online_dpo.py samples its
  2 completions per prompt (both samplers get the same rows).
- `fixed length`: a random tiny Llama of the same shape with EOS off, 32 new tokens for every row: the
  per-token cost alone (finished rows cannot be dropped here).
tokens/s counts the response tokens each call really produced (EOS included, pads after it not), so
the two samplers are compared on the same distribution, not on identical draws. The calls are
interleaved in one process, medians of --repeats rounds. "model forward share" is the part of the helper's
time spent inside the model's forward calls (timed in a pass of its own): what no change to the sampler's loop removes.
The last column checks the helper's sampling log-probs against a teacher-forced recompute (`common.response_logprobs`).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import generate, pad_rows, response_logprobs  # noqa: E402


def workloads(device, tiny=False):
    """(name, model, prompts, pad, eos, max_new_tokens, completions per prompt) per workload (tiny: a toy Llama only)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (int(n),), generator=g).tolist() for n in torch.randint(4, 17, (256,), generator=g)]
    fixed = LlamaForCausalLM(cfg).to(device).eval()
    if tiny:
        yield "fixed length", fixed, prompts, 0, None, 8, 1
        return
    from tasks import make_task

    task = make_task("min_length", device)
    policy = task.load_policy()
    for c in (1, 2):
        yield f"min_length pi_ref{' x2' if c > 1 else ''}", policy, task.train_prompts, task.pad_token_id, task.eos_token_id, task.max_new_tokens, c
    yield "fixed length", fixed, prompts, 0, None, 32, 1


def sample_rates(model, q, pad, eos, new, repeats, compile=False, before=None):
    """Median tokens/s of `common.generate` ("helper"), `model.generate`, with compile `generate(compile=True)` and with
    `before` (another checkout's generate) that one, calls interleaved (after one warm-up each, which compiles); max
    |sampling log-prob - teacher-forced recompute|; and the share of the helper's time inside the model's forward."""
    cuda = q.device.type == "cuda"
    g = torch.Generator(q.device).manual_seed(0)
    fns = {"helper": lambda: generate(model, q, pad, eos, new, 1.0, g)[0],
           "model.generate": lambda: model.generate(q, attention_mask=(q != pad).long(), do_sample=True, temperature=1.0, top_k=0,
                                                    top_p=1.0, max_new_tokens=new, pad_token_id=pad, eos_token_id=eos,
                                                    min_new_tokens=new if eos is None else 0)[:, q.shape[1]:]}
    if compile:
        fns["helper compile=True"] = lambda: generate(model, q, pad, eos, new, 1.0, g, compile=True)[0]
    if before is not None:
        fns["helper before"] = lambda: before(model, q, pad, eos, new, 1.0, g)[0]
    rate = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (and compile)
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            y = fn()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            real = (y != pad) & ((y == eos).long().cumsum(1) - (y == eos).long() == 0) if eos is not None else y != pad
            rate[k].append(int(real.sum()) / dt)
    r, lp = generate(model, q, pad, eos, new, 1.0, g)
    with torch.no_grad():
        scored, _ = response_logprobs(model, q, r, pad, eos)
    return {k: statistics.median(v) for k, v in rate.items()}, (lp - scored).abs().max().item(), forward_share(model, fns["helper"], repeats)


def forward_share(model, fn, repeats):
    """The share of `fn`'s time spent inside `model`'s forward calls: what a faster sampler loop could not remove. Timed
    in a pass of its own (the hooks' clock reads stay out of the rates above)."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    inside, entered = [0.0], [0.0]

    def enter(*_):
        sync()
        entered[0] = time.perf_counter()

    def leave(*_):
        sync()
        inside[0] += time.perf_counter() - entered[0]

    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    total = time.perf_counter() - t
    for h in hooks:
        h.remove()
    return inside[0] / total


def queries(prompts, batch, completions, pad, device):
    """`batch` rows: batch / completions prompts drawn with a fixed seed, each repeated `completions` times in a row."""
    rng = torch.Generator().manual_seed(batch)
    rows = [prompts[i] for i in torch.randint(len(prompts), (batch // completions,), generator=rng).tolist()]
    return pad_rows(rows, pad, left=True, device=device).repeat_interleave(completions, 0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time common.generate(compile=True) (static cache, compiled step)")
    p.add_argument("--baseline", default=None, help="another cleanpref checkout whose common.generate joins the rounds (before a change)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if a.cuda else "cpu")
    print(f"{device}, threads={torch.get_num_threads()}, fp32\n")
    cols = ["helper", "model.generate"] + (["helper compile=True"] if a.compile else []) + (["helper before"] if a.baseline else [])
    if a.baseline:
        from vs_trl import checkout

        before = checkout(Path(a.baseline).resolve())[0].generate
    print(f"| workload | batch | {' | '.join(c + ' tok/s' for c in cols)} | helper / generate |"
          + (" before / generate |" if a.baseline else "") + " helper: model forward share | max abs(sampling logp - recompute) |")
    print("|---|---|" + "---|" * (len(cols) + 3 + bool(a.baseline)))
    for name, model, prompts, pad, eos, new, c in workloads(device):
        for b in a.batch_sizes:
            med, err, share = sample_rates(model, queries(prompts, b, c, pad, device), pad, eos, new, a.repeats, a.compile,
                                    before if a.baseline else None)
            ratios = f"{med['helper'] / med['model.generate']:.2f}x" + (f" | {med['helper before'] / med['model.generate']:.2f}x" if a.baseline else "")
            print(f"| {name} | {b} | {' | '.join(f'{med[c]:.0f}' for c in cols)} | {ratios} | {share:.0%} | {err:.1e} |", flush=True)
    print(f"\nreproduce: OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/generate.py" + (" --cuda" if a.cuda else "")
          + (" --compile" if a.compile else "") + (f" --baseline {a.baseline}" if a.baseline else "") + (f" --repeats {a.repeats}" if a.repeats != 7 else "")
          + (f" --batch-sizes {' '.join(map(str, a.batch_sizes))}" if a.batch_sizes != [16, 64] else ""))


if __name__ == "__main__":
    main()
