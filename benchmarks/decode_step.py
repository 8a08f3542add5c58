"""Where one decode step's time goes: transformers' eager forward against the same step written out, and its arithmetic.

    OMP_NUM_THREADS=1 python benchmarks/decode_step.py                 # min_length's pi_ref, batch 64
    OMP_NUM_THREADS=1 python benchmarks/decode_step.py --compile       # also the written-out step under the CPU inductor

`common.generate` spends ~85% of its time inside the model's forward (`benchmarks/generate.py`, "forward share"). This
measures one decode step of the task's reference policy (2-layer Llama, width 128) at a fixed batch, after a prefill of
real left-padded prompts, with the sampler's own KV cache (`common._slab_cache`) and its [B, 1, 1, L] mask, for `--steps`
steps (the context grows by one each step); ms per step, medians of interleaved rounds:
- `eager forward`: `model(input_ids=..., cache=..., ...)`, what `common.generate` calls;
- `written out`: the same step on the model's own modules and weights in transformers' order of operations (RMSNorm,
  rotary embedding, SDPA, SiLU MLP): fewer Python-level calls, logits checked bitwise equal to the eager forward's;
- `written out, compiled` (--compile): its pre- and post-attention halves under `torch.compile(dynamic=True)`;
- `matmuls alone`, `attention alone`: the step's 15 linear layers and its 2 SDPA calls on inputs of the same shapes,
  with nothing around them: the arithmetic that no change to the Python around it removes.
The written-out step is a measurement, not the sampler: it is Llama-only and would bypass FSDP2's and autocast's module
hooks (docs/benchmarks.md says what it would buy).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import _slab_cache, pad_rows  # noqa: E402


def rms_norm(x, norm):
    """Llama's RMSNorm in transformers' order: fp32 statistics, weight times the input-dtype result."""
    h = x.float()
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_inputs(layer, h, cos, sin):
    """Pre-attention half of a layer: normed input -> rotated queries and keys, values ([B, heads, 1, head_dim])."""
    a, x = layer.self_attn, rms_norm(h, layer.input_layernorm)
    shape = (*x.shape[:-1], -1, a.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def after_attention(layer, h, o):
    """Post-attention half of a layer: output projection, residual, normed SiLU MLP, residual."""
    h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(*h.shape[:-1], -1))
    x, mlp = rms_norm(h, layer.post_attention_layernorm), layer.mlp
    return h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def written_out(model, before=attention_inputs, after=after_attention):
    """A decode step of a Llama causal LM on its own modules: (tokens [B, 1], positions [B, 1], cache, mask) -> logits."""
    base = model.model

    def step(tokens, positions, cache, mask):
        h = base.embed_tokens(tokens)
        cos, sin = (x[:, None] for x in base.rotary_emb(h, positions))
        for i, layer in enumerate(base.layers):
            q, k, v = before(layer, h, cos, sin)
            k, v = cache.layers[i].update(k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=k.shape[1] != q.shape[1])
            h = after(layer, h, o)
        return model.lm_head(rms_norm(h, base.norm))

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="decode steps per round after the prefill")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also the written-out step with its halves under torch.compile")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from tasks import make_task

    task = make_task("min_length", torch.device("cpu"))
    model = task.load_policy().eval()
    queries = pad_rows(task.train_prompts[: a.batch], task.pad_token_id, left=True)
    (b, lq), real = queries.shape, queries != task.pad_token_id
    mask = torch.cat([real, real.new_ones(b, a.steps)], 1)[:, None, None, :]
    tokens = torch.randint(2, model.config.vocab_size, (b, a.steps), generator=torch.Generator().manual_seed(0))
    positions = real.sum(1, keepdim=True)

    def decode(step):
        """(seconds per step, logits of every step) after a fresh prefill."""
        cache = _slab_cache(model, lq + a.steps)
        model(input_ids=queries, attention_mask=real, position_ids=(real.cumsum(1) - 1).clamp(min=0), cache=cache, use_cache=True, logits_to_keep=1)
        t, out = time.perf_counter(), []
        for s in range(a.steps):
            out.append(step(tokens[:, s : s + 1], positions + s, cache, mask[..., : lq + s + 1]))
        return (time.perf_counter() - t) / a.steps, out

    # the step's arithmetic alone, on inputs of its shapes: every linear layer on a [B, 1, d_in] input, SDPA over the cache
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(b, 1, m.in_features) for m in linears]
    cfg = model.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    q, kv = torch.randn(b, heads, 1, head_dim), torch.randn(2, b, kv_heads, lq + a.steps, head_dim)

    def matmuls(*_):
        for m, x in zip(linears, xs):
            F.linear(x, m.weight, m.bias)

    def attention(s):
        for _ in range(cfg.num_hidden_layers):
            F.scaled_dot_product_attention(q, kv[0, :, :, : lq + s + 1], kv[1, :, :, : lq + s + 1], attn_mask=mask[..., : lq + s + 1])

    contenders = {"eager forward": lambda *x: model(input_ids=x[0], position_ids=x[1], cache=x[2], attention_mask=x[3], use_cache=True).logits,
                  "written out": written_out(model)}
    if a.compile:
        contenders["written out, compiled"] = written_out(model, torch.compile(attention_inputs, dynamic=True), torch.compile(after_attention, dynamic=True))
    with torch.inference_mode():
        reference = decode(contenders["eager forward"])[1]
        for name, step in contenders.items():  # warm-up (compiles), and the equality check
            out = decode(step)[1]
            diff = max((x - y).abs().max().item() for x, y in zip(out, reference))
            contenders[name] = (step, "bitwise equal" if all(torch.equal(x, y) for x, y in zip(out, reference)) else f"max abs diff {diff:.1e}")
        times = {name: [] for name in [*contenders, "matmuls alone", "attention alone"]}
        for _ in range(a.rounds):
            for name, (step, _) in contenders.items():
                times[name].append(decode(step)[0])
            for name, fn in (("matmuls alone", matmuls), ("attention alone", attention)):
                t = time.perf_counter()
                for s in range(a.steps):
                    fn(s)
                times[name].append((time.perf_counter() - t) / a.steps)
    eager = statistics.median(times["eager forward"])
    print(f"min_length pi_ref ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}), batch {b}, {a.steps} decode steps after a {lq}-token "
          f"prefill, 1 thread, medians of {a.rounds} interleaved rounds\n")
    print("| step | ms per step | eager forward / this | logits |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {eager / statistics.median(ts):.2f}x | {contenders[name][1] if name in contenders else ''} |")
    print(f"\nreproduce: OMP_NUM_THREADS=1 python benchmarks/decode_step.py" + (f" --batch {a.batch}" if a.batch != 64 else "")
          + (" --compile" if a.compile else ""))


if __name__ == "__main__":
    main()
