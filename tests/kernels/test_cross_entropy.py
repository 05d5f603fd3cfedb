"""Fused loss-scaled cross entropy (compiled op and torch fallback) against F.cross_entropy * w.

Tolerances: fp32 loss and gradient to rtol 1e-6 (atol 1e-7 absorbs the last-bit rounding of
probabilities far below the row's mass); bf16/fp16 logits: the loss (fp32) to rtol 1e-5 against
the reference on the same values upcast, the gradient (rounded once to the logits' dtype)
within one unit in the last place of that dtype (bf16: 2^-7, fp16: 2^-10 relative), against the
reference's fp32 gradient rounded to the same dtype.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

from megaswift.kernels import _dispatch, loss_scaled_cross_entropy, loss_scaled_cross_entropy_reference

GRAD_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
            torch.float16: dict(rtol=2**-10, atol=1e-7)}


def make_case(tokens, vocab, dtype=torch.float32, scale=3.0, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * scale).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::ignore_every] = -100
    weights = torch.rand(tokens, generator=g) * 2
    return logits, labels, weights


def fused_loss_and_grad(logits, labels, weights, grad_out=None, **kw):
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf buffer, as the output layer's result is in training
    loss = loss_scaled_cross_entropy(y, labels, weights, **kw)
    g, = torch.autograd.grad(loss, x, grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), g


def reference_loss_and_grad(logits, labels, weights, grad_out=None, ignore_index=-100, vocab_size=None):
    x = logits.float().requires_grad_(True)
    loss = loss_scaled_cross_entropy_reference(x, labels, weights, ignore_index=ignore_index, vocab_size=vocab_size)
    g, = torch.autograd.grad(loss, x, grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), g


@pytest.mark.parametrize("tokens,vocab", [(1, 1), (1, 7), (9, 511), (17, 513), (33, 1000), (4, 32003)])
def test_fp32_matches_reference(kernel_path, tokens, vocab):
    logits, labels, weights = make_case(tokens, vocab, ignore_every=3 if tokens > 1 else 1000)
    grad_out = torch.rand(tokens)  # not all ones: the incoming gradient must scale each row
    loss, grad = fused_loss_and_grad(logits, labels, weights, grad_out)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, weights, grad_out)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1001, 4096])
def test_half_precision_matches_reference(kernel_path, dtype, vocab):
    logits, labels, weights = make_case(24, vocab, dtype)
    loss, grad = fused_loss_and_grad(logits, labels, weights)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, weights)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), **GRAD_TOL[dtype])


def test_ignored_tokens_and_zero_weights_give_exact_zeros(kernel_path):
    logits, labels, weights = make_case(12, 300)
    labels[labels == -100] = 3  # -100 is an ordinary (invalid) label here: the ignore index is 7
    labels[[1, 4]] = 7
    weights[[2, 9]] = 0.0
    loss, grad = fused_loss_and_grad(logits, labels, weights, ignore_index=7)
    for row in (1, 4, 2, 9):
        assert loss[row] == 0 and torch.count_nonzero(grad[row]) == 0
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, weights, ignore_index=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL[torch.float32])
    zero_loss, zero_grad = fused_loss_and_grad(logits, labels, torch.zeros(12))
    assert torch.count_nonzero(zero_loss) == 0 and torch.count_nonzero(zero_grad) == 0


def test_no_weights_equals_unit_weights_and_plain_cross_entropy(kernel_path):
    logits, labels, _ = make_case(10, 257)
    loss, grad = fused_loss_and_grad(logits, labels, None)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="none"), rtol=1e-6, atol=1e-7)
    loss_ones, grad_ones = fused_loss_and_grad(logits, labels, torch.ones(10))
    assert torch.equal(loss, loss_ones) and torch.equal(grad, grad_ones)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_and_masked_logits_stay_finite(kernel_path, dtype):
    logits, labels, weights = make_case(8, 700, scale=1.0, ignore_every=100)
    logits[0, :] = -1e4
    logits[1, labels[1]] = 1e4  # certain and right: loss 0
    logits[2, (labels[2] + 1) % 700] = 1e4  # certain and wrong: loss ~ 1e4, no overflow
    logits[3, ::2] = -1e4
    logits[4, 1::3] = float("-inf")  # masked vocab entries (the label is kept finite)
    logits[4, labels[4]] = 0.5
    logits = logits.to(dtype)
    loss, grad = fused_loss_and_grad(logits, labels, weights)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, weights)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), **GRAD_TOL[dtype])


def test_backward_consumes_logits_in_place_unless_asked_not_to(kernel_path):
    logits, labels, weights = make_case(6, 129)
    x = logits.clone().requires_grad_(True)
    y = x * 1
    loss = loss_scaled_cross_entropy(y, labels, weights)
    g, = torch.autograd.grad(loss.sum(), y)
    assert g.data_ptr() == y.data_ptr()  # the gradient lives in the logits buffer: no second copy
    kept = x * 1
    loss = loss_scaled_cross_entropy(kept, labels, weights, inplace_backward=False)
    g2, = torch.autograd.grad(loss.sum(), kept)
    assert torch.equal(kept.detach(), logits) and g2.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(g2, g)


def test_modifying_logits_before_backward_is_an_error(kernel_path):
    logits, labels, weights = make_case(4, 50)
    y = logits.clone().requires_grad_(True) * 1
    loss = loss_scaled_cross_entropy(y, labels, weights)
    y.add_(0)  # any in-place write bumps the version of the buffer the op saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("mutate,error,message", [
    (lambda x, y, w: (x, y[:-1], w), ValueError, r"labels must be \[tokens\] = \[8\], found \(7,\)"),
    (lambda x, y, w: (x, y.int(), w), TypeError, "labels must be torch.int64, found torch.int32"),
    (lambda x, y, w: (x, torch.full_like(y, 40), w), ValueError, r"label 40 at token 0 is outside \[0, 40\)"),
    (lambda x, y, w: (x, torch.full_like(y, -3), w), ValueError, r"label -3 at token 0 is outside"),
    (lambda x, y, w: (x.t().contiguous().t(), y, w), ValueError, "logits must be contiguous"),
    (lambda x, y, w: (x[None], y, w), ValueError, r"logits must be \[tokens, vocab_local\]"),
    (lambda x, y, w: (x.double(), y, w), TypeError, "logits dtype must be one of"),
    (lambda x, y, w: (x, y, w[:3]), ValueError, r"weights must be \[tokens\] = \[8\], found \(3,\)"),
    (lambda x, y, w: (x, y, (w * 10).long()), TypeError, "weights must be a floating tensor"),
])
def test_bad_input_raises_clear_error(kernel_path, mutate, error, message):
    logits, labels, weights = make_case(8, 40)
    with pytest.raises(error, match=message):
        loss_scaled_cross_entropy(*mutate(logits, labels, weights))


@pytest.mark.parametrize("vocab_size,message", [
    (41, r"vocab_size=41 must be in \[1, 40\].*true vocabulary size"),
    (0, r"vocab_size=0 must be in \[1, 40\]"),
    (30, r"label 3[0-9] at token \d+ is outside \[0, 30\)"),  # a label in the padding is an error, not a loss
])
def test_bad_vocab_size_raises_clear_error(kernel_path, vocab_size, message):
    logits, labels, weights = make_case(8, 40, seed=3)
    labels[0] = 35
    with pytest.raises(ValueError, match=message):
        loss_scaled_cross_entropy(logits, labels, weights, vocab_size=vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,padded", [(1000, 1024), (511, 1024), (513, 640), (1, 128)])
def test_padded_vocab_columns_take_no_part_and_get_no_gradient(kernel_path, dtype, vocab, padded):
    """Padding columns hold garbage (large values, nan, inf): the loss is the cross entropy over the true
    vocabulary, exactly as if the columns did not exist, and their gradient is exactly 0."""
    logits, labels, weights = make_case(21, padded, seed=4)
    labels = torch.where(labels == -100, labels, labels % vocab)
    logits[:, vocab:] = 60.0
    logits[3, vocab:] = float("nan")
    logits[5, vocab:] = float("inf")
    logits = logits.to(dtype)
    grad_out = torch.rand(21)
    loss, grad = fused_loss_and_grad(logits, labels, weights, grad_out, vocab_size=vocab)
    unpadded_loss, unpadded_grad = fused_loss_and_grad(logits[:, :vocab].contiguous(), labels, weights, grad_out)
    assert torch.equal(loss, unpadded_loss) and torch.equal(grad[:, :vocab], unpadded_grad)
    assert torch.count_nonzero(grad[:, vocab:]) == 0
    expected = F.cross_entropy(logits[:, :vocab].float(), labels, reduction="none") * weights
    torch.testing.assert_close(loss, expected, rtol=1e-6 if dtype == torch.float32 else 1e-5, atol=1e-6)


def test_a_shard_of_padding_only_adds_nothing(kernel_path):
    """The partials of a shard past the true vocabulary (a high TP rank of a small vocab) are (-inf, 0, 0)."""
    from megaswift.kernels.cross_entropy import _partials
    logits, labels, _ = make_case(6, 64)
    row_max, sum_exp, target = _partials(logits, labels, 128, 100, -100)  # columns 128..191, vocab 100
    assert torch.equal(row_max, torch.full((6,), float("-inf"))) and torch.count_nonzero(sum_exp) == 0
    assert torch.count_nonzero(target) == 0


def test_compiled_ops_reject_bad_arguments_themselves():
    """Direct callers of torch.ops.megaswift get an error, never a crash or a wrong answer."""
    if _dispatch.why_not_compiled("loss_scaled_cross_entropy", "cpu") is not None:
        pytest.skip("csrc not built")
    ops = torch.ops.megaswift
    x, y = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        ops.cross_entropy_partials(x.t(), y[:2].repeat(5), 0, 10, -100)
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.cross_entropy_partials(x, y.int(), 0, 10, -100)
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        ops.cross_entropy_partials(x, y, 0, 0, -100)
    with pytest.raises(ValueError, match="scale must be contiguous"):
        ops.cross_entropy_backward_(x, y, torch.zeros(4), torch.zeros(3), 0, 10, -100, x)
    with pytest.raises(ValueError, match="out must be"):
        ops.cross_entropy_backward_(x, y, torch.zeros(4), torch.zeros(4), 0, 10, -100, torch.empty(4, 9))


def test_fallback_is_announced_once(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "why_not_compiled", lambda op, device: "extension missing in this test")
    _dispatch._announce_fallback.cache_clear()
    logits, labels, weights = make_case(4, 30)
    with caplog.at_level(logging.WARNING, logger="megaswift.kernels"):
        for _ in range(3):
            fused_loss_and_grad(logits, labels, weights)
    messages = [r.getMessage() for r in caplog.records if "loss_scaled_cross_entropy" in r.getMessage()]
    assert len(messages) == 1 and "torch reference" in messages[0] and "extension missing in this test" in messages[0]
    _dispatch._announce_fallback.cache_clear()


def test_producer_that_saves_its_output_is_protected(kernel_path):
    """tanh saves its output for backward: overwriting it in place must fail loudly, and
    inplace_backward=False must then give the right gradient."""
    logits, labels, weights = make_case(5, 64)
    x = logits.clone().requires_grad_(True)
    loss = loss_scaled_cross_entropy(torch.tanh(x), labels, weights)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
    loss = loss_scaled_cross_entropy(torch.tanh(x), labels, weights, inplace_backward=False)
    g, = torch.autograd.grad(loss.sum(), x)
    xr = logits.clone().requires_grad_(True)
    ref_g, = torch.autograd.grad(loss_scaled_cross_entropy_reference(torch.tanh(xr), labels, weights).sum(), xr)
    torch.testing.assert_close(g, ref_g, rtol=1e-6, atol=1e-7)
