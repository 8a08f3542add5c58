"""common.py against naive references: log-probs, masking under left padding, sampling."""

import pytest
import torch
from conftest import EOS, PAD, tiny_llama

from common import exact_div, fused_logprobs, generate, pad_rows, response_logprobs


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
