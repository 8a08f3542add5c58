"""The little that every cleanpref script shares: log-probs, sampling, and two tiny utilities.

- `fused_logprobs`: per-token log p(label | context) from final hidden states and the output
  embedding, computed in row chunks so the [N, V] logits never exist at once.
- `response_logprobs`: per-token log-probs of the response part of left-padded `query + response`
  batches under a Hugging Face causal LM (pads and post-EOS tokens masked out).
- `generate`: batched temperature sampling with a KV cache; returns the sampling log-probs too.
- `response_mask`, `pad_rows`, `exact_div`, `disable_dropout`: small helpers every script needs.

Why a hand-written autograd Function rather than torch 2.13's `F.linear_cross_entropy`: the built-in
cannot divide by a sampling temperature inside its chunks, does not accumulate bf16 inputs in fp32,
and `benchmarks/logprobs.py` measures this Function as fast as the built-in with its best chunk size
and faster than it with its default options, at the same memory (table in the README).
"""

import torch


def _chunk_rows(device: torch.device) -> int:
    # CPU: 256 rows was fastest at V=8192 and V=32000 (64..2048 swept, README); CUDA: untuned guess
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
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None,
            None,
            None,
            None,
        )


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


def response_logprobs(model, queries, responses, pad_token_id: int, eos_token_id: int | None, temperature: float = 1.0):
    """Per-token log pi(response_t | query, response_<t) of a Hugging Face causal LM.

    queries: [B, Lq] left-padded with pad_token_id; responses: [B, Lr], padded after EOS.
    Attention mask from the pad token, position ids = exclusive cumsum of the mask (so left padding
    does not shift positions), logits divided by `temperature` (score at the sampling temperature),
    the pad token's logit set to -inf exactly as in `generate`.
    Returns (logps [B, Lr] fp32 with 0 where masked, mask [B, Lr] bool from `response_mask`).
    Sum logps over dim 1 for sequence log-probs.
    """
    _check_plain_logits(model)
    ids = torch.cat([queries, responses], dim=1)
    attn = (ids != pad_token_id).long()
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state
    hidden = hidden[:, queries.shape[1] - 1 : -1]  # state before each response token, [B, Lr, d]
    mask = response_mask(responses, pad_token_id, eos_token_id)
    labels = responses.masked_fill(~mask, 0)  # any in-range id; masked out below
    logps = fused_logprobs(hidden, model.get_output_embeddings().weight, labels, temperature, banned_token=pad_token_id)
    return logps.masked_fill(~mask, 0.0), mask


@torch.no_grad()
def generate(model, queries, pad_token_id: int, eos_token_id: int | None, max_new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None):
    """Sample responses from a Hugging Face causal LM with a KV cache.

    queries: [B, Lq] left-padded with pad_token_id. Each row stops at its first EOS (eos_token_id
    None: fixed length max_new_tokens); positions after it hold pad_token_id (which must differ from
    EOS). The loop ends once every row is done. generator: a torch.Generator on the model's device.
    The pad token is never sampled (its logit is -inf: a sampled pad would read as padding), so the
    policy is the model restricted to non-pad tokens, in sampling and in `response_logprobs` alike.
    Returns (responses [B, L] int64, logps [B, L] fp32: log-prob of each sampled token at
    `temperature`, 0 on pads), L <= max_new_tokens. A response without EOS was truncated.
    """
    if pad_token_id == eos_token_id:
        raise ValueError("generate: pad_token_id must differ from eos_token_id, or responses cannot end")
    if queries.dim() != 2 or queries.shape[0] == 0 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"generate: expected queries [B>0, Lq], max_new_tokens >= 1, temperature > 0; got {tuple(queries.shape)}, {max_new_tokens}, {temperature}")
    b, lq = queries.shape
    attn = torch.ones(b, lq + max_new_tokens, dtype=torch.long, device=queries.device)
    attn[:, :lq] = queries != pad_token_id
    position = (attn[:, :lq].cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=queries, attention_mask=attn[:, :lq], position_ids=position, use_cache=True, logits_to_keep=1)
    position = position[:, -1:]
    responses = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=queries.device)
    logps = torch.zeros(b, max_new_tokens, device=queries.device)
    done = torch.zeros(b, dtype=torch.bool, device=queries.device)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature
        logits[:, pad_token_id] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        # inverse-CDF sampling: exact, faster than torch.multinomial on CPU, never picks a p=0 token
        cdf = logp.exp().cumsum(dim=-1)
        u = torch.rand(b, 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
        token = token.masked_fill(done, pad_token_id)
        responses[:, t] = token
        logps[:, t] = logp.gather(1, token[:, None]).squeeze(1).masked_fill(done, 0.0)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attn[:, : lq + t + 1], position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
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
    """a // b, or a one-line error (SystemExit, no traceback) naming `what` when b does not divide a."""
    if b <= 0 or a % b != 0:
        raise SystemExit(f"{what}: {a} is not divisible by {b}; pick sizes that divide")
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
