"""common.py against naive references: log-probs, masking under left padding, padding-free batches, sampling."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

import common
from common import exact_div, fused_logprobs, generate, length_buckets, pad_rows, response_logprobs


def naive_logprobs(h, w, y, temperature=1.0, banned=None):
    logits = (h.float() @ w.float().t()) / temperature
    if banned is not None:
        logits[..., banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1).gather(-1, y[..., None]).squeeze(-1)


@pytest.mark.parametrize("shape,chunk,temperature,banned", [((37,), 8, 1.0, None), ((37,), 8, 0.7, None), ((3, 11), 5, 1.3, 0), ((64,), None, 1.0, 4)])
def test_fused_matches_naive_values_and_grads_fp32(shape, chunk, temperature, banned):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, 24, generator=g, requires_grad=True)
    w = torch.randn(97, 24, generator=g, requires_grad=True)
    y = torch.randint(5, 97, shape, generator=g)
    up = torch.randn(shape, generator=g)  # arbitrary upstream gradient
    ours = fused_logprobs(h, w, y, temperature, chunk_size=chunk, banned_token=banned)
    dh, dw = torch.autograd.grad((ours * up).sum(), (h, w))
    ref = naive_logprobs(h, w, y, temperature, banned)
    rdh, rdw = torch.autograd.grad((ref * up).sum(), (h, w))
    assert ours.shape == shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh, rdh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, rdw, atol=1e-5, rtol=1e-5)


def test_fused_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (2, 7), generator=g)
    y = y.clamp(min=1)
    assert torch.autograd.gradcheck(lambda a, b: fused_logprobs(a, b, y, 0.8, chunk_size=3, banned_token=0), (h, w))


def test_fused_bf16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(2)
    h32, w32 = torch.randn(50, 32, generator=g), torch.randn(300, 32, generator=g)
    y = torch.randint(0, 300, (50,), generator=g)
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    ours = fused_logprobs(h, w, y, chunk_size=16)
    assert ours.dtype == torch.float32
    ref_in = (h.detach().float().requires_grad_(), w.detach().float().requires_grad_())
    ref = naive_logprobs(*ref_in, y)  # same bf16-rounded inputs, fp32 math
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    ours.sum().backward()
    ref.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.float(), ref_in[0].grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad.float(), ref_in[1].grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("h,w,y,match", [
    (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long), "hidden"),
    (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), "labels"),
    (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.int32), "int64"),
    (torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), 10), r"\[0, 10\)"),
    (torch.randn(0, 8), torch.randn(10, 8), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long), "dtype"),
])
def test_fused_bad_input_is_one_line_value_error(h, w, y, match):
    with pytest.raises(ValueError, match=match):
        fused_logprobs(h, w, y)


def left_pad(rows, width):
    return pad_rows([[PAD] * (width - len(r)) + r for r in rows], PAD, left=True)


def test_pad_rows():
    assert pad_rows([[3, 4], [5]], PAD, left=True).tolist() == [[3, 4], [PAD, 5]]
    assert pad_rows([[3, 4], [5], []], PAD, left=False).tolist() == [[3, 4], [5, PAD], [PAD, PAD]]


def test_response_logprobs_padding_invariant_and_equal_to_model_logits(tiny_lm):
    query, response = [5, 6, 7], [8, 9, EOS]
    ql, qs = left_pad([query], 3), left_pad([query], 8)  # same row without and with left padding
    r = torch.tensor([response + [PAD, PAD]])  # right pads after EOS
    lp_short, mask = response_logprobs(tiny_lm, ql, r, PAD, EOS, temperature=0.9)
    lp_padded, _ = response_logprobs(tiny_lm, qs, r, PAD, EOS, temperature=0.9)
    torch.testing.assert_close(lp_short, lp_padded, atol=1e-5, rtol=0)
    assert mask.tolist() == [[True, True, True, False, False]]
    assert (lp_short[0, 3:] == 0).all()
    with torch.no_grad():  # reference: the model's own logits on the unpadded sequence, pad banned
        logits = tiny_lm(torch.tensor([query + response])).logits[0, 2:-1] / 0.9
    logits[:, PAD] = float("-inf")
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    torch.testing.assert_close(lp_short[0, :3], ref, atol=1e-5, rtol=1e-5)


def test_response_logprobs_ignores_tokens_after_eos(tiny_lm):
    q = left_pad([[5, 6]], 2)
    a, _ = response_logprobs(tiny_lm, q, torch.tensor([[8, EOS, 9, 9]]), PAD, EOS)
    b, mask = response_logprobs(tiny_lm, q, torch.tensor([[8, EOS, 3, 4]]), PAD, EOS)
    assert mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(a, b)


def test_response_logprobs_rejects_post_processed_logits():
    model = tiny_llama(final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        response_logprobs(model, left_pad([[5]], 1), torch.tensor([[6]]), PAD, EOS)


def test_generate_stops_at_eos_pads_after_and_is_seeded(tiny_lm):
    q = left_pad([[5, 6, 7], [8], [9, 10]] * 8, 3)
    r1, _ = generate(tiny_lm, q, PAD, EOS, 40, generator=torch.Generator().manual_seed(3))
    r2, _ = generate(tiny_lm, q, PAD, EOS, 40, generator=torch.Generator().manual_seed(3))
    r3, _ = generate(tiny_lm, q, PAD, EOS, 40, generator=torch.Generator().manual_seed(4))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    ended = 0
    for row in r1.tolist():
        if EOS in row:
            ended += 1
            after = row[row.index(EOS) + 1:]
            assert after == [PAD] * len(after)
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]
    assert ended > 0  # a 40-token budget at vocab 40 ends some rows


def test_generate_frequencies_match_softmax():
    model = tiny_llama(vocab=12, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked, non-uniform next-token distribution
    n, temperature = 6000, 0.8
    q = torch.tensor([[3, 4]]).repeat(n, 1)
    r, _ = generate(model, q, PAD, EOS, 1, temperature, torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(model(q[:1]).logits[0, -1].double() / temperature, -1)
    p[PAD] = 0.0  # never sampled
    p /= p.sum()
    freq = torch.bincount(r[:, 0], minlength=12).double() / n
    assert p.max() - p.min() > 0.05  # the test is not trivially on a uniform distribution
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq, p)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_match_scoring(tiny_lm, temperature):
    q = left_pad([[5, 6, 7, 8], [9], [10, 11]] * 4, 4)
    r, lp = generate(tiny_lm, q, PAD, EOS, 24, temperature, torch.Generator().manual_seed(1))
    scored, mask = response_logprobs(tiny_lm, q, r, PAD, EOS, temperature)
    assert torch.equal(mask, r != PAD)
    assert (lp[~mask] == 0).all()
    torch.testing.assert_close(lp, scored, atol=1e-5, rtol=0)


def test_exact_div():
    assert exact_div(12, 4, "batch_size / minibatch_size") == 3
    with pytest.raises(SystemExit, match="batch_size / minibatch_size: 10 is not divisible by 4"):
        exact_div(10, 4, "batch_size / minibatch_size")


# --- no compute on padding: the grouped, trimmed batches equal the padded computation ---------------------

def padded_logprobs(model, queries, responses, temperature):
    """The padded batch's log-probs, written out: one forward over cat(queries, responses) with the pad mask."""
    ids = torch.cat([queries, responses], 1)
    attn = (ids != PAD).long()
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    logits = logits[:, queries.shape[1] - 1 : -1].float() / temperature
    logits[..., PAD] = float("-inf")
    mask = responses != PAD
    mask &= (responses == EOS).long().cumsum(1) - (responses == EOS).long() == 0
    return torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1).masked_fill(~mask, 0.0), mask


def ragged_batch(seed, b=20, lq=7, lr=12):
    """Left-padded queries of 1..lq tokens; responses of 1..lr tokens, some with EOS mid-row and tokens after it,
    one of a single token, one of max length without EOS, one of max length ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.full((b, lq), PAD), torch.full((b, lr), PAD)
    for i in range(b):
        nq, nr = int(torch.randint(1, lq + 1, (), generator=g)), int(torch.randint(1, lr + 1, (), generator=g))
        q[i, lq - nq:] = torch.randint(2, 40, (nq,), generator=g)
        r[i, :nr] = torch.randint(2, 40, (nr,), generator=g)
        if i % 3 == 0 and nr > 2:
            r[i, nr // 2] = EOS  # EOS mid-row: the tokens after it are not scored
    r[0], r[1], r[2] = torch.randint(2, 40, (lr,), generator=g), PAD, torch.randint(2, 40, (lr,), generator=g)
    r[1, 0], r[2, -1] = 7, EOS
    return q, r


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unpadded_response_logprobs_equal_the_padded_batch(tiny_lm, temperature, monkeypatch):
    q, r = ragged_batch(0)
    ref, ref_mask = padded_logprobs(tiny_lm, q, r, temperature)
    ref_grads = torch.autograd.grad(ref.sum(), list(tiny_lm.parameters()))
    for overhead in (0, 10**6):  # one group per length, and a single group
        monkeypatch.setattr(common, "_bucket_overhead", lambda device: overhead)
        groups = list(common.unpadded_groups(q, r, ref_mask, PAD))
        assert len(groups) > 1 if overhead == 0 else len(groups) == 1
        assert all("attention_mask" not in kwargs for _, _, kwargs, _, _ in groups)  # no pads inside rows: causal fast path
        assert sum(rows.numel() for _, rows, _, _, _ in groups) < q.numel() + r.numel()  # less than the padded batch
        logps, mask = response_logprobs(tiny_lm, q, r, PAD, EOS, temperature)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(logps, ref, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(logps.sum(), list(tiny_lm.parameters()))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unpadded_response_logprobs_with_pads_inside_rows(tiny_lm):
    """Pads inside a query or a response (no script makes them) fall back to the padded batch's mask rules."""
    q = torch.tensor([[5, PAD, 6], [PAD, PAD, 9], [PAD, PAD, PAD]])
    r = torch.tensor([[8, PAD, 9, EOS], [7, 7, EOS, PAD], [4, EOS, PAD, PAD]])
    ref, _ = padded_logprobs(tiny_lm, q, r, 1.0)
    logps, _ = response_logprobs(tiny_lm, q, r, PAD, EOS)
    torch.testing.assert_close(logps[:2], ref[:2], atol=1e-5, rtol=0)
    assert torch.isfinite(logps).all()  # an all-pad query: nothing to compare with (the padded batch attends to nothing)


def test_unpadded_reward_scores_equal_the_padded_batch(monkeypatch):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from algos.reward_model import reward_scores

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, num_labels=1)
    rm = LlamaForSequenceClassification(cfg).eval()
    q, r = ragged_batch(1)
    r = r.masked_fill((r == EOS).long().cumsum(1) - (r == EOS).long() > 0, PAD)  # as sampled: pads after EOS
    ids = torch.cat([q, r], 1)
    attn = (ids != PAD).long()
    with torch.no_grad():
        ref = rm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[:, 0]
        for overhead in (0, 10**6):
            monkeypatch.setattr(common, "_bucket_overhead", lambda device: overhead)
            torch.testing.assert_close(reward_scores(rm, q, r, PAD), ref, atol=1e-5, rtol=0)
        q2, r2 = torch.tensor([[5, PAD, 6], [PAD, 3, 4]]), torch.tensor([[8, PAD, EOS], [PAD, PAD, PAD]])  # pads inside; empty response
        ids = torch.cat([q2, r2], 1)
        attn = (ids != PAD).long()
        ref = rm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[:, 0]
        torch.testing.assert_close(reward_scores(rm, q2, r2, PAD), ref, atol=1e-5, rtol=0)


def test_length_buckets_is_the_cheapest_contiguous_split():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 5, 40, 500])
        groups = length_buckets(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        cost = sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)
        s = sorted(lengths, reverse=True)
        best = min(sum(overhead + (b - a) * s[a] for a, b in zip((0,) + cuts, cuts + (len(s),)))
                   for k in range(len(s)) for cuts in itertools.combinations(range(1, len(s)), k))
        assert cost == best, (lengths, overhead, groups)
    assert length_buckets([5, 50, 6, 48], 10) == [[1, 3], [2, 0]]  # the two long rows together, the two short ones


# --- the sampler: tokens fixed by the generator, whatever the batching ---------------------------------------

def reference_sample(model, queries, max_new_tokens, temperature, generator, eos=EOS):
    """The sampling rule written plainly: no KV cache, the whole sequence recomputed at every step, one uniform
    per row per step (finished rows included), token = first index whose CDF exceeds u * total."""
    b = queries.shape[0]
    seq, done, tokens, logps = queries.clone(), torch.zeros(b, dtype=torch.bool), [], []
    for t in range(max_new_tokens):
        u = torch.rand(b, 1, generator=generator)
        attn = (seq != PAD).long()
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
        logits = logits.float() / temperature
        logits[:, PAD] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        cdf = logp.exp().cumsum(-1)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[1] - 1).squeeze(1).masked_fill(done, PAD)
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1).masked_fill(done, 0.0))
        if eos is not None:
            done |= token == eos
        if done.all():
            break
        seq = torch.cat([seq, token.masked_fill(done, 3)[:, None]], 1)  # any non-pad id after EOS: never read
    return torch.stack(tokens, 1), torch.stack(logps, 1)


@pytest.mark.parametrize("temperature,eos", [(1.0, EOS), (0.7, EOS), (1.0, None)])
def test_generate_equals_the_reference_sampler(tiny_lm, temperature, eos):
    q = left_pad([[5, 6, 7, 8], [9], [10, 11], [12, 13, 14]] * 4, 4)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    r, lp = generate(tiny_lm, q, PAD, eos, 30, temperature, g1)
    ref_r, ref_lp = reference_sample(tiny_lm, q, 30, temperature, g2, eos)
    assert torch.equal(r, ref_r)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same number of draws: later calls see the same stream
    if eos is not None:
        assert 0 < (r == EOS).any(1).sum() < len(r)  # some rows ended early, some ran to the end


@pytest.mark.parametrize("batch,completions,eos,lengths,attn", [
    (1, 1, EOS, (1, 6), "sdpa"), (1, 1, None, (1, 6), "sdpa"),  # one row: no pads, no mask
    (64, 4, EOS, (1, 6), "sdpa"), (64, 4, None, (1, 6), "sdpa"), (64, 1, EOS, (1, 6), "sdpa"),  # left pads: SDPA's 4D mask
    (16, 2, EOS, (5, 6), "sdpa"),  # equal lengths: no pads, no mask
    (24, 3, EOS, (1, 6), "eager"),  # another attention implementation: the 2D mask
])
def test_generate_prefills_each_prompt_once_and_equals_the_reference(tiny_lm, batch, completions, eos, lengths, attn):
    """Callers repeat each prompt C times: the prompt is prefilled once and its cache copied to its C rows; the tokens are
    still the reference sampler's for the same generator, the log-probs equal within float rounding."""
    model = tiny_lm if attn == "sdpa" else tiny_llama(attn_implementation="eager")
    g = torch.Generator().manual_seed(batch)
    sizes = torch.randint(*lengths, (batch // completions,), generator=g).tolist()
    q = left_pad([torch.randint(2, 40, (n,), generator=g).tolist() for n in sizes], 5).repeat_interleave(completions, 0)
    prefill = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: prefill.append(args[0].shape))
    try:
        r, lp = generate(model, q, PAD, eos, 30, 1.0, torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    assert prefill[0] == (len(torch.unique_consecutive(q, dim=0)), 5) and prefill[0][0] <= batch // completions
    assert not r.is_inference() and not lp.is_inference()  # the model runs under inference_mode; callers get normal tensors
    ref_r, ref_lp = reference_sample(model, q, 30, 1.0, torch.Generator().manual_seed(3), eos)
    assert torch.equal(r, ref_r)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    if eos is not None and batch > 1:
        assert 0 < (r == EOS).any(1).sum() < len(r)  # some rows ended early, some ran on


@pytest.mark.parametrize("compact_at", [0.0, 0.5])
def test_generate_compaction_changes_nothing(tiny_lm, compact_at, monkeypatch):
    q = left_pad([[5, 6, 7, 8], [9], [10, 11]] * 6, 4)
    monkeypatch.setattr(common, "COMPACT_AT", 2.0)  # never drop finished rows
    whole = generate(tiny_lm, q, PAD, EOS, 40, 1.0, torch.Generator().manual_seed(2))
    monkeypatch.setattr(common, "COMPACT_AT", compact_at)  # 0: drop rows as soon as any finishes
    compacted = generate(tiny_lm, q, PAD, EOS, 40, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(whole[0], compacted[0]) and torch.equal(whole[1], compacted[1])
    assert (whole[0] == EOS).any(1).sum() >= len(q) // 2  # the rows really finished at different steps


def test_generate_compiled_static_cache_equals_eager(tiny_lm):
    """compile=True (StaticCache + torch.compile; CUDA graphs on a GPU) samples the same tokens, here on CPU."""
    q = left_pad([[5, 6, 7], [8], [9, 10]] * 4, 3)
    eager = generate(tiny_lm, q, PAD, EOS, 20, 1.0, torch.Generator().manual_seed(1))
    compiled = generate(tiny_lm, q, PAD, EOS, 20, 1.0, torch.Generator().manual_seed(1), compile=True)
    assert torch.equal(eager[0], compiled[0])
    torch.testing.assert_close(eager[1], compiled[1], atol=1e-5, rtol=0)
