"""CUDA kernels against the torch reference (run by tests/gpu/run.sh on a GPU machine).

Tolerances: fp32 uses expf, so the same bounds as on CPU but rtol 1e-5 for the gradient (a
different summation order over 10^5 columns); bf16/fp16 use __expf and one ulp of the dtype.
"""
import pytest
import torch

from megaswift.kernels import _dispatch, loss_scaled_cross_entropy, loss_scaled_cross_entropy_reference

pytestmark = pytest.mark.gpu

GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-7),
            torch.float16: dict(rtol=2**-10, atol=1e-7)}


@pytest.fixture(autouse=True)
def cuda_kernels_built():
    reason = _dispatch.why_not_compiled("loss_scaled_cross_entropy", "cuda")
    assert reason is None, f"the CUDA extension must be built for the GPU tests: {reason}"


def case(tokens, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = -100
    weights = torch.rand(tokens, generator=g) * 2
    weights[3 % tokens] = 0.0
    return logits.cuda(), labels.cuda(), weights.cuda()


def fused(logits, labels, weights, grad_out, vocab_size=None):
    x = logits.clone().requires_grad_(True)
    loss = loss_scaled_cross_entropy(x * 1, labels, weights, vocab_size=vocab_size)
    return loss.detach(), torch.autograd.grad(loss, x, grad_out)[0]


def reference(logits, labels, weights, grad_out, vocab_size=None):
    x = logits.float().requires_grad_(True)
    loss = loss_scaled_cross_entropy_reference(x, labels, weights, vocab_size=vocab_size)
    return loss.detach(), torch.autograd.grad(loss, x, grad_out)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,vocab", [(1, 1), (3, 7), (64, 1001), (32, 32000), (16, 128256), (8, 128257)])
def test_cuda_matches_reference(dtype, tokens, vocab):
    logits, labels, weights = case(tokens, vocab, dtype)
    grad_out = torch.rand(tokens, device="cuda")
    loss, grad = fused(logits, labels, weights, grad_out)
    ref_loss, ref_grad = reference(logits, labels, weights, grad_out)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6 if dtype == torch.float32 else 1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), **GRAD_TOL[dtype])
    ignored = labels == -100
    assert torch.count_nonzero(loss[ignored]) == 0 and torch.count_nonzero(grad[ignored]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_extreme_and_masked_logits(dtype):
    logits, labels, weights = case(6, 5003, torch.float32)
    logits[0] = -1e4
    logits[1, labels[1]] = 1e4
    logits[2, (labels[2] + 1) % 5003] = 1e4
    logits[4, 1::3] = float("-inf")
    logits[4, labels[4]] = 0.5
    logits = logits.to(dtype)
    grad_out = torch.ones(6, device="cuda")
    loss, grad = fused(logits, labels, weights, grad_out)
    assert torch.isfinite(loss).all() and torch.isfinite(grad.float()).all()
    ref_loss, ref_grad = reference(logits, labels, weights, grad_out)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,padded", [(1000, 1024), (1003, 1152), (128256, 128512)])
def test_cuda_padded_vocab_is_left_out(dtype, vocab, padded):
    """Columns past vocab_size (garbage here: large logits) take no part and get exactly zero gradient."""
    logits, labels, weights = case(16, padded, torch.float32)
    labels = labels.where(labels < vocab, labels % vocab).where(labels != -100, -100)
    logits[:, vocab:] = 50.0
    logits = logits.to(dtype)
    grad_out = torch.rand(16, device="cuda")
    loss, grad = fused(logits, labels, weights, grad_out, vocab_size=vocab)
    ref_loss, ref_grad = reference(logits, labels, weights, grad_out, vocab_size=vocab)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6 if dtype == torch.float32 else 1e-5, atol=1e-6)
    assert torch.count_nonzero(grad[:, vocab:]) == 0
    torch.testing.assert_close(grad[:, :vocab].float(), ref_grad[:, :vocab].to(dtype).float(), **GRAD_TOL[dtype])


def test_cuda_agrees_with_cpu_kernel():
    logits, labels, weights = case(33, 4099, torch.bfloat16)
    grad_out = torch.rand(33, device="cuda")
    loss, grad = fused(logits, labels, weights, grad_out)
    cpu_loss, cpu_grad = fused(logits.cpu(), labels.cpu(), weights.cpu(), grad_out.cpu())
    torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().float(), cpu_grad.float(), **GRAD_TOL[torch.bfloat16])


def test_cuda_bad_input_is_an_error():
    logits, labels, weights = case(4, 100, torch.float32)
    with pytest.raises(ValueError, match="labels are on cpu"):
        loss_scaled_cross_entropy(logits, labels.cpu(), weights)
    with pytest.raises(ValueError, match="outside"):
        loss_scaled_cross_entropy(logits, torch.full_like(labels, 100), weights)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        torch.ops.megaswift.cross_entropy_partials(logits.t(), torch.zeros(100, dtype=torch.long, device="cuda"),
                                                   0, 100, -100)
