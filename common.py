"""The little that every cleanpref script shares: log-probs, sampling, and two tiny utilities.

- `fused_logprobs`: per-token log p(label | context) from final hidden states and the output
  embedding, computed in row chunks so the [N, V] logits never exist at once.
- `response_logprobs`: per-token log-probs of the response part of left-padded `query + response`
  batches under a Hugging Face causal LM (pads and post-EOS tokens masked out), computed without
  padding: `unpadded_groups` cuts each row to its real tokens and `length_buckets` groups rows of
  similar length, so a batch whose responses average half the longest costs about half.
- `generate`: batched temperature sampling with a KV cache; returns the sampling log-probs too.
  Finished rows leave the batch; `compile=True` gives a static cache and a compiled decode step.
- `response_mask`, `pad_rows`, `exact_div`, `disable_dropout`, `user_errors`: small helpers every script needs.
- Past one device (the last section; docs/scaling.md): `start_run` (torchrun process group, rank 0 owns runs/),
  `wrap` (DDP or FSDP2, bf16 autocast), `shard` (this rank's part of a global minibatch and its loss factor),
  `all_reduce_mean` (training statistics), `save_checkpoint` / `open_metrics` / `resume` (atomic checkpoints, --resume).
  B and M stay global: every rank holds the global batch, drawn by the same generators as one process; `generate` and
  no-grad `response_logprobs` of a wrapped model split its rows over ranks (uniforms drawn for the whole batch, decode
  steps in lockstep) and gather the results, so a run on N processes samples what one process samples.

Choices measured in docs/benchmarks.md: length groups, not packed rows, to skip padding (any model, SDPA's causal
path); a hand-written Function, not `F.linear_cross_entropy` (temperature and pad ban inside chunks, fp32 accumulation).
"""

import contextlib
import functools
import json
import os
import random
import shutil
import sys
import weakref
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist  # (imported by torch already)


def _chunk_rows(device: torch.device) -> int:
    # CPU: 256 rows was fastest at V=8192 and V=32000 (64..2048 swept, docs/benchmarks.md); CUDA: untuned guess
    return 1024 if device.type == "cuda" else 256


class _FusedLogProbs(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's softmax.

    Peak memory beyond inputs and gradients: one [chunk, V] fp32 buffer. All arithmetic is fp32 (or fp64 for gradcheck), whatever the input dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, banned):
        # hidden [N, d], weight [V, d], labels [N] -> logps [N]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.to(acc)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = torch.mm(hidden[s:e].to(acc), w.t(), out=buf[: e - s])  # [rows, V] logits
            z.div_(temperature)
            if banned is not None:
                z[:, banned] = float("-inf")
            picked = z.gather(1, labels[s:e, None]).squeeze(1)
            zmax = z.max(dim=1).values  # log-sum-exp in place: no second [rows, V] buffer
            lse[s:e] = z.sub_(zmax[:, None]).exp_().sum(dim=1).log_().add_(zmax)
            logps[s:e] = picked - lse[s:e]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.chunk, ctx.banned = temperature, chunk, banned
        return logps

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        temperature, chunk, banned = ctx.temperature, ctx.chunk, ctx.banned
        acc = lse.dtype
        w = weight.to(acc)
        g = grad.to(acc) / temperature  # d logp / d z = (onehot - softmax) / T
        n = hidden.shape[0]
        dh = torch.empty(n, weight.shape[1], dtype=acc, device=hidden.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e].to(acc)
            z = torch.mm(h, w.t(), out=buf[: e - s])
            z.div_(temperature).sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])  # -g * softmax
            if banned is not None:
                z[:, banned] = 0.0
            z.scatter_add_(1, labels[s:e, None], g[s:e, None])  # + g * onehot: dlogp/dz, [rows, V]
            if dh is not None:
                torch.mm(z, w, out=dh[s:e])
            if dw is not None:
                dw.addmm_(z.t(), h)
        return None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype), None, None, None, None


def fused_logprobs(hidden, weight, labels, temperature: float = 1.0, chunk_size: int | None = None, banned_token: int | None = None):
    """log softmax(hidden @ weight.T / temperature)[label], without materialising the logits.

    hidden: [..., d] float (fp32, bf16, fp16 or fp64); weight: [V, d] same dtype; labels: [...] int64
    in [0, V). Returns [...] log-probs in fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden
    and weight. chunk_size: rows per chunk (default 256 on CPU, 1024 on CUDA). banned_token: a column
    whose logit is -inf (the pad token: cleanpref's policies never emit it, see `generate`).
    """
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"fused_logprobs: expected float hidden and weight, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_logprobs: expected hidden [..., d] and weight [V, d], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"fused_logprobs: hidden, weight and labels must share dtype/device, got {hidden.dtype}/{hidden.device}, {weight.dtype}/{weight.device}, {labels.device}")
    if labels.dtype != torch.long or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_logprobs: expected int64 labels of shape {tuple(hidden.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("fused_logprobs: empty batch (no tokens to score)")
    if int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]:
        raise ValueError(f"fused_logprobs: labels must lie in [0, {weight.shape[0]}), got [{int(labels.min())}, {int(labels.max())}]")
    if not temperature > 0:
        raise ValueError(f"fused_logprobs: temperature must be > 0, got {temperature}")
    chunk = chunk_size or _chunk_rows(hidden.device)
    flat = _FusedLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), float(temperature), chunk, banned_token)
    return flat.view(labels.shape)


def response_mask(responses, pad_token_id: int, eos_token_id: int | None):
    """[B, Lr] bool: True on response tokens up to and including the first EOS, never on pads."""
    mask = responses != pad_token_id
    if eos_token_id is not None:
        is_eos = (responses == eos_token_id).long()
        mask &= (is_eos.cumsum(1) - is_eos) == 0  # nothing after the first EOS
    return mask


def _check_plain_logits(model):
    cfg, head = model.config, model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: expected a causal LM (AutoModelForCausalLM)")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} post-processes its logits ({name}={getattr(cfg, name)}); cleanpref's fused log-probs assume logits = hidden @ W.T")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s output layer has a bias; cleanpref's fused log-probs assume logits = hidden @ W.T")


def length_buckets(lengths, overhead: int):
    """Split rows into groups of similar length: lists of row indices (longest first) minimising the padded
    work sum over groups of (rows * longest + overhead), exactly, by dynamic programming over the sorted lengths.
    overhead: the fixed cost of one more forward pass, in tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    longest = np.array([lengths[i] for i in order], dtype=np.int64)  # descending: a group's width is its first row's
    best, start = np.zeros(len(order) + 1, dtype=np.int64), np.zeros(len(order) + 1, dtype=np.int64)
    for k in range(1, len(order) + 1):  # best[k]: cheapest split of the k longest rows; the last group is rows [j, k)
        cost = best[:k] + overhead + (k - np.arange(k)) * longest[:k]
        start[k] = int(cost.argmin())
        best[k] = cost[start[k]]
    groups, k = [], len(order)
    while k > 0:
        groups.append(order[start[k] : k])
        k = int(start[k])
    return groups[::-1]


def _bucket_overhead(device: torch.device) -> int:
    # one more forward(+backward) costs about this many tokens of work (CPU: 64-128 measured equally fast,
    # 512 slower; docs/benchmarks.md); CUDA: an unmeasured guess, kernel launches cost more there
    return 1024 if device.type == "cuda" else 128


def unpadded_groups(queries, responses, keep, pad_token_id: int):
    """`cat(queries, responses)` without its padding, as a few right-padded batches of rows of similar length.

    queries: [B, Lq] left-padded; responses: [B, Lr]; keep: [B, Lr] bool, the response positions the caller
    needs (each row is cut after its last True; at least one response token is kept). Each row becomes its
    query from the first non-pad token followed by its kept response, left-aligned; rows are grouped by
    `length_buckets`. Yields (group [n] row indices, input_ids [n, W], model kwargs, n_query [n], n_response [n]).

    A row's pads all come after its real tokens, which never attend to them under the causal mask, so when no
    row has a pad inside it the model gets no attention mask (causal: SDPA's fast path) and positions 0, 1, ...,
    exactly the padded batch's (exclusive cumsum of its mask); pads inside a row get the padded batch's rules.
    """
    lq, lr = queries.shape[1], responses.shape[1]
    real_q = queries != pad_token_id
    start = torch.where(real_q.any(1), real_q.long().argmax(1), lq - 1)  # first non-pad column; keep >= 1 column
    n_query = lq - start
    n_response = (keep * torch.arange(1, lr + 1, device=keep.device)).amax(1).clamp(min=1)
    ids = torch.cat([queries, responses], dim=1)
    for group in length_buckets((n_query + n_response).tolist(), _bucket_overhead(ids.device)):
        group = torch.tensor(group, device=ids.device)
        length = n_query[group] + n_response[group]
        cols = torch.arange(int(length.max()), device=ids.device)
        inside = cols < length[:, None]
        rows = ids[group].gather(1, (start[group, None] + cols).clamp(max=ids.shape[1] - 1)).masked_fill(~inside, pad_token_id)
        if bool(((rows != pad_token_id) == inside).all()):
            kwargs = dict(position_ids=cols.expand(len(rows), -1))
        else:
            attn = (rows != pad_token_id).long()
            kwargs = dict(attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0))
        yield group, rows, kwargs, n_query[group], n_response[group]


def response_logprobs(model, queries, responses, pad_token_id: int, eos_token_id: int | None, temperature: float = 1.0):
    """Per-token log pi(response_t | query, response_<t) of a Hugging Face causal LM.

    queries: [B, Lq] left-padded with pad_token_id; responses: [B, Lr], padded after EOS.
    Attention mask from the pad token, position ids = exclusive cumsum of the mask (so left padding
    does not shift positions), logits divided by `temperature` (score at the sampling temperature),
    the pad token's logit set to -inf exactly as in `generate`.
    Returns (logps [B, Lr] fp32 with 0 where masked, mask [B, Lr] bool from `response_mask`).
    Sum logps over dim 1 for sequence log-probs.

    No compute on padding: the forward runs on `unpadded_groups` (rows cut after their first EOS, grouped
    by length), and one fused log-prob call covers every scored token; equal to the padded batch's
    computation to float rounding (tests/test_common.py).
    """
    _check_plain_logits(model)
    if responses.shape[1] == 0:
        raise ValueError("response_logprobs: empty responses (no tokens to score)")
    mask = response_mask(responses, pad_token_id, eos_token_id)
    if not torch.is_grad_enabled() and distributed(model):  # scoring: every rank holds the whole batch, scores its share
        lo, hi = rank_rows(len(queries))
        logps = _response_logprobs(model, queries[lo:hi], responses[lo:hi], mask[lo:hi], pad_token_id, temperature)
        return gather_rows(logps, len(queries)), mask
    return _response_logprobs(model, queries, responses, mask, pad_token_id, temperature), mask


def _response_logprobs(model, queries, responses, mask, pad_token_id, temperature):
    states, where = [], []
    groups = list(unpadded_groups(queries, responses, mask, pad_token_id))
    for group, rows, kwargs, n_query, n_response in groups:
        hidden = last_hidden_state(model, input_ids=rows, **kwargs)  # [n, W, d]
        t = torch.arange(rows.shape[1], device=rows.device) - (n_query[:, None] - 1)  # the response token each state predicts
        scored = (t >= 0) & (t < n_response[:, None])
        states.append(hidden[scored])
        where.append((group[:, None].expand_as(t)[scored], t[scored]))
    lockstep(model, len(groups), input_ids=groups[-1][1][:1, :1], position_ids=groups[-1][2]["position_ids"][:1, :1])  # FSDP2
    row, col = (torch.cat(x) for x in zip(*where))
    labels = responses[row, col].masked_fill(~mask[row, col], 0)  # any in-range id; masked out below
    weight = model.get_output_embeddings().weight
    flat = fused_logprobs(torch.cat(states).to(weight.dtype), weight, labels, temperature, banned_token=pad_token_id)
    logps = flat.new_zeros(mask.shape).index_put((row, col), flat)
    return logps.masked_fill(~mask, 0.0)


@functools.cache
def _slab_layer():
    """A full-attention KV cache layer class that writes into a preallocated [B, heads, capacity, head_dim] slab (made on
    first use: `--help` should not pay for importing transformers). Hugging Face's DynamicLayer concatenates the whole cache
    at every step: O(L) copying per token, O(L^2) per response. Keys and values handed to attention are views."""
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.slabs = [x.new_empty(*x.shape[:2], self.capacity, x.shape[3]) for x in (key_states, value_states)]
            n = self.length + key_states.shape[-2]
            self.slabs[0][:, :, self.length : n] = key_states
            self.slabs[1][:, :, self.length : n] = value_states
            self.length = n
            self.keys, self.values = self.slabs[0][:, :, :n], self.slabs[1][:, :, :n]
            return self.keys, self.values

        def batch_select_indices(self, indices):  # drop finished rows, or copy a prompt's rows to its completions
            if self.is_initialized:
                self.slabs = [s[indices] for s in self.slabs]
                self.keys, self.values = self.slabs[0][:, :, : self.length], self.slabs[1][:, :, : self.length]

    return SlabLayer


def _slab_cache(model, capacity: int):
    """Hugging Face's DynamicCache for `model` with its full-attention layers replaced by `_slab_layer`s
    (sliding-window and other special layers keep their own)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [_slab_layer()(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


_COMPILED = weakref.WeakKeyDictionary()  # model -> (compiled forward, {(batch, cache length): StaticCache})


def _static_decoder(model, batch: int, length: int):
    """The compiled forward of `model` and a StaticCache of `length` positions for `batch` rows, both reused across calls:
    the same buffers every call let CUDA graphs replay (torch.compile's "reduce-overhead") instead of re-recording."""
    if model not in _COMPILED:
        mode = "reduce-overhead" if model.device.type == "cuda" else None  # CPU: plain inductor
        _COMPILED[model] = (torch.compile(model, fullgraph=True, mode=mode), {})
    step, caches = _COMPILED[model]
    if (batch, length) not in caches:
        from transformers.cache_utils import StaticCache

        caches[(batch, length)] = StaticCache(config=model.config, max_cache_len=length)
    caches[(batch, length)].reset()
    return step, caches[(batch, length)]


COMPACT_AT = 0.25  # drop finished rows once they are this share of the batch (0.125-0.5 measured alike on min_length)


@torch.no_grad()
def generate(model, queries, pad_token_id: int, eos_token_id: int | None, max_new_tokens: int, temperature: float = 1.0,
             generator: torch.Generator | None = None, compile: bool = False):
    """Sample responses from a Hugging Face causal LM with a KV cache.

    queries: [B, Lq] left-padded with pad_token_id. Each row stops at its first EOS (eos_token_id None: fixed length
    max_new_tokens); positions after it hold pad_token_id (which must differ from EOS). The loop ends once every row is
    done. generator: a torch.Generator on the model's device. The pad token is never sampled (its logit is -inf: a sampled
    pad would read as padding), so the policy is the model restricted to non-pad tokens, in sampling and in
    `response_logprobs` alike. Returns (responses [B, L] int64, logps [B, L] fp32: log-prob of each sampled token at
    `temperature`, 0 on pads), L <= max_new_tokens. A response without EOS was truncated.

    Sampling draws one uniform per row and step from `generator`, for every row (finished ones included), and picks the
    token by inverse CDF: the tokens depend only on the generator and the model's logits, not on the batching below.
    - Default (eager): equal consecutive rows (a prompt repeated for its C completions) are prefilled once; the KV cache
      lives in preallocated slabs (`_slab_layer`); finished rows leave the batch once they are COMPACT_AT of it.
    - compile=True (for CUDA; on CPU slower at batch 64 and a minute to compile, docs/benchmarks.md): a StaticCache and
      a compiled decode step (CUDA graphs on a GPU), the batch kept whole so that shapes stay static; the query width is
      rounded up to a multiple of 32 so that a run compiles for a few shapes only. Worth it for long runs.
    """
    if pad_token_id == eos_token_id:
        raise ValueError("generate: pad_token_id must differ from eos_token_id, or responses cannot end")
    if queries.dim() != 2 or queries.shape[0] == 0 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"generate: expected queries [B>0, Lq], max_new_tokens >= 1, temperature > 0; got {tuple(queries.shape)}, {max_new_tokens}, {temperature}")
    spread = distributed(model)  # under torchrun (a model given to `wrap`): this rank samples its share of the rows
    total, (lo, hi) = queries.shape[0], rank_rows(queries.shape[0]) if spread else (0, queries.shape[0])
    queries = queries[lo:hi]
    if compile:
        queries = torch.nn.functional.pad(queries, (-queries.shape[1] % 32, 0), value=pad_token_id)
    (b, lq), device = queries.shape, queries.device
    real = queries != pad_token_id
    step, cache = _static_decoder(model, b, lq + max_new_tokens) if compile else (model, _slab_cache(model, lq + max_new_tokens))
    # callers repeat each prompt C times in a row: the eager path prefills each distinct prompt once, then copies its cache rows
    prompts, copies = (queries, None) if compile else torch.unique_consecutive(queries, dim=0, return_inverse=True)
    mask = prompts != pad_token_id
    fast = torch.inference_mode(not compile and model not in _SHARDED)  # 1.14-1.19x here; static caches and FSDP2 reuse buffers
    with fast:
        logits = model(input_ids=prompts, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    if len(prompts) < b:
        cache.batch_select_indices(copies)
        logits = logits[copies]
    position = (real.sum(1, keepdim=True) - 1).clamp(min=0)
    mask = torch.cat([real, real.new_ones(b, max_new_tokens)], 1)  # the decode steps' mask, built once
    if not compile and bool(real.all()):  # no left pads: no mask at all (causal)
        mask = None
    elif not compile and model.config._attn_implementation == "sdpa" and all(type(x) is _slab_layer() for x in cache.layers):
        mask = mask[:, None, None, :]  # SDPA's own [B, 1, 1, L] form: nothing to convert at each step
    responses, logps = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device), torch.zeros(b, max_new_tokens, device=device)
    rows = torch.arange(b, device=device)  # the original row of each row still in the batch
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        u = torch.rand(total, 1, generator=generator, device=device)[lo:hi]  # one uniform per row of the whole batch, every step
        logits = logits.float() / temperature
        logits[:, pad_token_id] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        # inverse-CDF sampling: exact, faster than torch.multinomial on CPU, never picks a p=0 token
        cdf = logp.exp().cumsum(dim=-1)
        token = torch.searchsorted(cdf, u[rows] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
        token = token.masked_fill(done, pad_token_id)
        responses[rows, t] = token
        logps[rows, t] = logp.gather(1, token[:, None]).squeeze(1).masked_fill(done, 0.0)
        if eos_token_id is not None:
            done |= token == eos_token_id
        n_done = int(done.sum())
        if t == max_new_tokens - 1 or (_all_ranks(n_done == len(rows)) if spread else n_done == len(rows)):  # ranks step in lockstep
            break
        if not compile and n_done >= max(1, COMPACT_AT * len(rows)):  # drop the finished rows
            keep = (~done).nonzero().squeeze(1)
            keep = keep if len(keep) else keep.new_zeros(1)  # all done here, not elsewhere: one row keeps stepping
            cache.batch_select_indices(keep)
            rows, token, position, done, mask = rows[keep], token[keep], position[keep], done[keep], mask if mask is None else mask[keep]
        position = position + 1
        if compile:  # static shapes: the whole mask (positions not yet written are causally masked)
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            out = step(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
        else:
            with fast:
                out = model(input_ids=token[:, None], attention_mask=mask if mask is None else mask[..., : lq + t + 1],
                            position_ids=position, cache=cache, use_cache=True)
        logits = out.logits[:, -1]
    if spread:
        return gather_rows(responses[:, : t + 1], total), gather_rows(logps[:, : t + 1], total)
    return responses[:, : t + 1], logps[:, : t + 1]


def pad_rows(rows, pad_token_id: int, left: bool, device=None):
    """List of token-id lists -> [B, max_len] int64, padded on the left (queries) or right (responses)."""
    if len(rows) == 0:
        raise ValueError("pad_rows: empty batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            (out[i, width - len(r):] if left else out[i, : len(r)]).copy_(torch.as_tensor(r))
    return out.to(device) if device is not None else out


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, or a one-line error (SystemExit, no traceback) naming `what` when a size is < 1 or b does not divide a."""
    if a < 1 or b < 1 or a % b != 0:
        raise SystemExit(f"{what}: " + (f"sizes must be >= 1, got {a} and {b}" if min(a, b) < 1 else f"{a} is not divisible by {b}; pick sizes that divide"))
    return a // b


def disable_dropout(model):
    """Set every dropout probability to 0 (preference losses compare log-probs across passes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # e.g. Llama's attention
            module.attention_dropout = 0.0
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Past one device (docs/scaling.md): torchrun, DDP or FSDP2, bf16 autocast, atomic checkpoints and --resume.
# Every rank holds the GLOBAL batch (drawn by the same generators as one process); `generate` and scoring passes split
# its rows over ranks and gather the results, and each gradient step trains on this rank's `shard` of the minibatch.
# ---------------------------------------------------------------------------------------------------------------------

_RUNNERS = weakref.WeakKeyDictionary()  # model -> what runs its forward: the DDP wrapper, the FSDP2 root, or the autocast model
_SHARDED = weakref.WeakSet()  # models sharded by FSDP2: every rank must run each of their forwards
_DISTRIBUTED = weakref.WeakSet()  # models given to `wrap` under torchrun: sampling and scoring split rows over ranks (others,
# such as the task builders' models, stay local: a rank building a task's cache must not wait on the other ranks)


def world():
    """(rank, world size): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_rows(n: int):
    """(start, stop): this rank's contiguous share of n rows (shares differ by at most one row)."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def gather_rows(x, n: int):
    """Every rank's `rank_rows(n)` share of a [rows, ...] tensor (same trailing shape on every rank) -> the whole [n, ...]."""
    size = world()[1]
    if size == 1:
        return x
    most = -(-n // size)
    parts = [torch.empty_like(x[:1]).expand(most, *x.shape[1:]).contiguous() for _ in range(size)]
    dist.all_gather(parts, torch.cat([x, x[:1].expand(most - len(x), *x.shape[1:])]) if len(x) < most else x)
    return torch.cat([p[: (r + 1) * n // size - r * n // size] for r, p in enumerate(parts)])


def _all_reduce(values, op):
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def _all_ranks(flag: bool) -> bool:
    """True when `flag` is True on every rank."""
    return flag if world()[1] == 1 else bool(_all_reduce([float(flag)], dist.ReduceOp.MIN)[0])


def _max_over_ranks(n: int) -> int:
    return n if world()[1] == 1 else int(_all_reduce([float(n)], dist.ReduceOp.MAX)[0])


def all_reduce_mean(metrics: dict) -> dict:
    """The mean over ranks of a dict of floats (training statistics; evaluation metrics are equal on every rank already)."""
    size = world()[1]
    if size == 1 or not metrics:
        return metrics
    return dict(zip(metrics, (v / size for v in _all_reduce([float(v) for v in metrics.values()], dist.ReduceOp.SUM))))


def shard(indices, weights=None):
    """This rank's share of a global minibatch of row indices, and the factor its loss is multiplied by.

    DDP averages gradients over ranks; multiplying each rank's mean loss by world size * (its share of the minibatch's
    weight) makes that average the gradient of the global minibatch mean, also when shares differ (online_dpo's
    dropped pairs). weights: [rows of the batch], the loss's denominator per row (default 1: a mean over rows; PPO
    passes token counts). A rank with no rows gets the first row at factor 0: every rank runs each forward and backward.
    """
    rank, size = world()
    if size == 1:
        return indices, 1.0
    lo, hi = rank_rows(len(indices))
    weights = torch.ones(len(indices)) if weights is None else weights[indices].double().cpu()
    scale = size * float(weights[lo:hi].sum()) / max(float(weights.sum()), 1e-12)
    return (indices[lo:hi], scale) if hi > lo else (indices[:1], 0.0)


@contextlib.contextmanager
def user_errors():
    """Around a script's main: a bad argument or input (a SystemExit with a message) -> that one line on stderr, exit code 2."""
    try:
        yield
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            sys.exit(2)
        raise


def _leave():
    """At exit under torchrun: a barrier, its handle kept (a gloo thread freeing a work during interpreter teardown aborts)."""
    _leave.work = dist.barrier(async_op=True)
    _leave.work.wait()
    dist.destroy_process_group()


def start_run(args, run_name: str):
    """The set-up every script shares, before anything is written. Returns (run_name, run_dir).

    Checks the sizes, cadences and rates every script has (> 0) and the seed. With --resume runs/<run>: every other argument
    comes from that run's args.json; a flag given with it must agree, except a longer --num-iterations and `free` ones.
    Under torchrun (WORLD_SIZE set): joins the process group (nccl with --cuda, else gloo), pins the process to its GPU,
    takes rank 0's run name, checks that --batch-size and --minibatch-size (GLOBAL sizes) divide by the world size, and
    records args.world_size; ranks > 0 print nothing and do not track. `open_metrics` creates runs/<run>/ (rank 0).
    """
    import atexit
    from pathlib import Path

    if args.resume:
        run_dir, run_name = Path(args.resume), Path(args.resume).name
        if not (run_dir / "args.json").exists() or not (run_dir / "model" / TRAINING_STATE).exists():
            raise SystemExit(f"--resume {run_dir}: no run with a checkpoint there (one is saved with --save-model; by sft.py and reward_model.py every --save-every steps)")
        given = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in sys.argv[1:] if a.startswith("--")}  # flags
        free = ("threads", "save_every", "track", "wandb_project_name", "wandb_entity")  # may change: no effect on the numbers
        for k, v in json.loads((run_dir / "args.json").read_text()).items():
            if k in given - {"resume"} and getattr(args, k) != v and not (k in free or k == "num_iterations" and args.num_iterations > v):
                raise SystemExit(f"--resume {run_dir}: --{k.replace('_', '-')} {getattr(args, k)} differs from the run's {v}; a resumed run keeps its "
                                 f"arguments but a longer --num-iterations and {', '.join('--' + f.replace('_', '-') for f in free)}: drop the flag, or start a new run")
            if k not in given | {"resume", "world_size"} and hasattr(args, k):
                setattr(args, k, v)
    for k in ("batch_size", "minibatch_size", "num_iterations", "update_epochs", "eval_every", "eval_dense_every", "num_eval_prompts",
              "num_epochs", "save_every", "threads", "learning_rate", "max_grad_norm", "max_prompt_length", "max_length"):  # those it has
        if getattr(args, k, None) is not None and not 0 < getattr(args, k) < float("inf"):
            raise SystemExit(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    if not 0 <= args.seed < 2**32:
        raise SystemExit(f"--seed must lie in [0, 2**32), got {args.seed}")
    if "WORLD_SIZE" in os.environ:
        cuda = args.cuda and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_leave)
        holder = [run_name]
        dist.broadcast_object_list(holder, src=0)
        run_name = holder[0]
    elif args.fsdp:
        raise SystemExit("--fsdp shards over processes: launch with torchrun (torchrun --nproc-per-node N algos/...)")
    if args.bf16 and args.cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise SystemExit("--bf16: this GPU has no bfloat16 support; drop --bf16")
    rank, size = world()
    run_dir = Path(args.resume or getattr(args, "output_dir", "") or Path("runs") / run_name)  # sft.py, reward_model.py: --output-dir
    args.world_size = size
    if hasattr(args, "batch_size"):  # sft.py and reward_model.py have minibatches only
        exact_div(args.batch_size, size, "--batch-size / the number of processes (B is global)")
    exact_div(args.minibatch_size, size, "--minibatch-size / the number of processes (M is global)")
    if rank != 0:
        sys.stdout, args.track = open(os.devnull, "w"), False
    return run_name, run_dir


def wrap(model, args):
    """The model made ready for this run; the same object is returned (save_pretrained, generate and the scripts'
    attribute access keep working). Under torchrun a trained model (any parameter requires grad) gets DDP, a frozen one
    stays replicated; --fsdp shards either with FSDP2 (`fully_shard` on each decoder layer, then the root). --bf16 runs
    its forward under bf16 autocast (parameters and Adam state stay fp32). Log-probs and hidden states then run through
    the wrapper (`last_hidden_state`), so DDP sees the forward and FSDP2 gathers the shards."""
    device = next(model.parameters()).device
    if world()[1] > 1:
        _DISTRIBUTED.add(model)
    if args.bf16:
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
        _RUNNERS[model] = model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        _RUNNERS[model] = model
        _SHARDED.add(model)
    elif world()[1] > 1 and any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast in forward: buffers (rotary tables) are equal on every rank, and forwards per rank may differ
        _RUNNERS[model] = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  forward_sync_buffers=False)
    return model


def distributed(model) -> bool:
    """True for a model given to `wrap` under torchrun: its sampling, scoring and training split rows over ranks. Other
    models (the task builders', trained by one rank while the others wait on the cache lock) stay local: no collective."""
    return model in _DISTRIBUTED


def forward(model, **inputs):
    """`model(**inputs)` through what `wrap` made of it (DDP sees the forward; FSDP2 gathers the shards)."""
    return _RUNNERS.get(model, model)(**inputs)


def lockstep(model, n: int, **one_row):
    """FSDP2 gathers each layer in every forward: after this rank's n forwards of a sharded `model`, run it on `one_row`
    until this rank has run as many as the busiest rank. Nothing for other models."""
    if model in _SHARDED:
        for _ in range(_max_over_ranks(n) - n):
            forward(model, **one_row)


def last_hidden_state(model, **inputs):
    """`model.base_model(**inputs).last_hidden_state`, computed by a call of the whole model when `wrap` registered a
    runner for it (DDP and FSDP2 act in the wrapped module's forward; the output head runs on one position only)."""
    runner = _RUNNERS.get(model)
    if runner is None:
        return model.base_model(**inputs).last_hidden_state
    out = []
    handle = model.base_model.register_forward_hook(lambda module, args, output: out.append(output.last_hidden_state))
    try:
        runner(**inputs, **({"logits_to_keep": 1} if model.get_output_embeddings() is not None else {}))
    finally:
        handle.remove()
    return out[0]


TRAINING_STATE = "training_state.pt"


def _full_state(model, optimizer=None):
    """(model state dict, optimizer state dict) gathered in full, on CPU (FSDP2: a collective; rank 0 gets the values)."""
    if model not in _SHARDED:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None


def _load_full_state(model, model_state, optimizer=None, optimizer_state=None):
    if model not in _SHARDED:
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def _pack(value):
    if isinstance(value, torch.Generator):
        return ("generator", value.get_state())
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.nn.Module):  # (model, its optimizer)
        return ("model", _full_state(*value))
    return ("value", value)


def save_checkpoint(run_dir, policy, optimizer, tokenizer, row: dict, state: dict):
    """Write the resume point atomically: runs/<run>/model is a symlink swapped in one rename to checkpoint-<iteration>/,
    which holds the policy (save_pretrained: full weights, gathered from FSDP2 shards), the tokenizer, and
    training_state.pt (the optimizer, every RNG, the metrics `row` of its iteration, written after it, and the script's
    `state`: generators, (model, optimizer) pairs and plain values). A kill while saving leaves the previous checkpoint in
    place. Called on every rank."""
    policy_state, optimizer_state = _full_state(policy, optimizer)
    packed = {k: _pack(v) for k, v in state.items()}
    if world()[0] != 0:
        return
    name = f"checkpoint-{row['iteration']:06d}"
    tmp, final, link = run_dir / f".{name}.tmp", run_dir / name, run_dir / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, state_dict=policy_state)
    tokenizer.save_pretrained(tmp)
    rngs = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), random=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save(dict(iteration=row["iteration"], row=row, optimizer=optimizer_state, rngs=rngs, state=packed), tmp / TRAINING_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    if link.is_dir() and not link.is_symlink():  # a run saved by an older cleanpref: a plain directory
        shutil.rmtree(link)
    (run_dir / ".model.tmp").unlink(missing_ok=True)  # left by a kill between these lines
    os.symlink(name, run_dir / ".model.tmp")
    os.replace(run_dir / ".model.tmp", link)  # atomic
    for old in run_dir.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def open_metrics(run_dir, args):
    """runs/<run>/ made (rank 0, once the task and models loaded) with args.json, and its metrics.jsonl for appending: a fresh file,
    or with --resume the rows before the checkpoint's row and that row (later ones and a line cut short are dropped). Ranks > 0: os.devnull."""
    if world()[0] != 0:
        return open(os.devnull, "w")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json.tmp").write_text(json.dumps(asdict(args), indent=2, default=str))
    os.replace(run_dir / "args.json.tmp", run_dir / "args.json")  # atomic: a kill leaves the old one, still resumable
    path = run_dir / "metrics.jsonl"
    if not args.resume:
        return open(path, "w")
    last = torch.load(run_dir / "model" / TRAINING_STATE, map_location="cpu", weights_only=False)["row"]
    lines = open(path).readlines() if path.exists() else []
    if lines and not lines[-1].endswith("\n"):  # each row is written whole with its newline: this one was cut short
        print(f"[cleanpref] {path}: dropped its last line, cut short ({len(lines.pop())} characters; a full disk or a kill)")
    rows = [line for line in lines if line.strip() and json.loads(line)["iteration"] < last["iteration"]]
    (run_dir / "metrics.jsonl.tmp").write_text("".join(rows) + json.dumps(last) + "\n")
    os.replace(run_dir / "metrics.jsonl.tmp", path)
    return open(path, "a")


def resume(args, run_dir, policy, optimizer, state: dict):
    """With --resume: load the latest checkpoint into the policy, its optimizer, every RNG, and the script's `state`
    (generators and (model, optimizer) pairs in place) -> (first iteration to run, [the state's values, restored]).
    Without: (1, [the state's values]). Call it after every set-up that consumes random numbers."""
    if not args.resume:
        return 1, list(state.values())
    saved = torch.load(run_dir / "model" / TRAINING_STATE, map_location="cpu", weights_only=False)
    if list(saved["state"]) != list(state):  # e.g. a dpo.py run given to online_dpo.py
        raise SystemExit(f"--resume {run_dir}: its checkpoint holds {list(saved['state'])}, not this script's {list(state)}: resume it with the script that made it")
    from safetensors.torch import load_file
    from transformers.core_model_loading import revert_weight_conversion

    own = policy.state_dict()
    saved_as = {id(t): k for k, t in revert_weight_conversion(policy, dict(own)).items()}  # save_pretrained's names (Pythia: embed_out)
    files = {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(f).items()}
    weights = {k: files[saved_as[id(t)]] for k, t in own.items() if saved_as.get(id(t)) in files}
    for k in own.keys() - weights.keys():  # save_pretrained stores tied weights once: take the twin's
        weights[k] = next(weights[j] for j in weights.keys() & own.keys() if own[j].data_ptr() == own[k].data_ptr())
    _load_full_state(policy, weights, optimizer, saved["optimizer"])
    values = []
    for (kind, packed), current in zip(saved["state"].values(), state.values()):
        if kind == "generator":
            current.set_state(packed)
        elif kind == "model":
            _load_full_state(current[0], packed[0], current[1], packed[1])
        values.append(current if kind != "value" else packed)
    rngs = saved["rngs"]
    torch.set_rng_state(rngs["torch"])
    np.random.set_state(rngs["numpy"])
    random.setstate(rngs["random"])
    if rngs["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])
    print(f"resumed {run_dir} after iteration {saved['iteration']}")
    return saved["iteration"] + 1, values
