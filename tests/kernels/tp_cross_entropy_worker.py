"""Run under torchrun (2 ranks, gloo): each rank holds its megatron-style vocab shard of the same
logits; the vocab-parallel loss and each shard's gradient must equal the unsplit computation. With a
padded vocabulary (true vocab < 2 x vocab_local) the padding columns hold garbage: the loss must be the
cross entropy over the true vocabulary, and the padding's gradient exactly 0, also where one rank holds
nothing but padding."""
import torch
import torch.distributed as dist

from megaswift.kernels import _dispatch, loss_scaled_cross_entropy, loss_scaled_cross_entropy_reference

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-7)}


def check(dtype, vocab_local, tokens, path, vocab_size=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = vocab_size or vocab_local * world
    g = torch.Generator().manual_seed(1234)
    full = torch.randn(tokens, vocab_local * world, generator=g) * 3
    full[0, vocab_local:] = -1e4  # row 0: all the mass on rank 0's shard
    if vocab > vocab_local:  # (when rank 1 holds real vocabulary at all)
        full[1, :vocab_local] = -1e4  # row 1: all the mass on rank 1's shard
    full[3:, vocab:] = 60.0  # padding: large logits that would dominate any softmax they entered
    full = full.to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[0], labels[1], labels[2] = 3, vocab - 1, -100
    weights = torch.rand(tokens, generator=g)
    grad_out = torch.rand(tokens, generator=g)

    ref_x = full.float().requires_grad_(True)
    ref_loss = loss_scaled_cross_entropy_reference(ref_x, labels, weights, vocab_size=vocab_size)
    ref_grad, = torch.autograd.grad(ref_loss, ref_x, grad_out)

    shard = full[:, rank * vocab_local:(rank + 1) * vocab_local].clone().requires_grad_(True)
    logits = shard * 1  # non-leaf, as the output layer's result
    loss = loss_scaled_cross_entropy(logits, labels, weights, tp_group=dist.group.WORLD, vocab_size=vocab_size)
    grad, = torch.autograd.grad(loss, shard, grad_out)

    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5 if dtype != torch.float32 else 1e-6, atol=1e-6)
    expected = ref_grad[:, rank * vocab_local:(rank + 1) * vocab_local].to(dtype).float()
    torch.testing.assert_close(grad.float(), expected, **TOL[dtype])
    padding = grad[:, max(vocab - rank * vocab_local, 0):]
    assert torch.count_nonzero(padding) == 0, f"rank {rank}: padding columns got a gradient"
    print(f"rank {rank} {path} {dtype} vocab_local={vocab_local} vocab_size={vocab_size}: ok", flush=True)


def main():
    dist.init_process_group("gloo")
    for path in ("csrc", "reference"):
        if path == "reference":
            _dispatch.why_not_compiled = lambda op, device: "forced by the TP test"
        elif _dispatch.why_not_compiled("loss_scaled_cross_entropy", "cpu") is not None:
            print(f"rank {dist.get_rank()} csrc not built: skipped", flush=True)
            continue
        for dtype in (torch.float32, torch.bfloat16):
            check(dtype, vocab_local=517, tokens=29, path=path)
            check(dtype, vocab_local=517, tokens=29, path=path, vocab_size=1000)  # rank 1: 483 real, 34 padding
        check(torch.float32, vocab_local=517, tokens=29, path=path, vocab_size=300)  # rank 1: padding only
    dist.barrier()
    if dist.get_rank() == 0:
        print("TP cross entropy OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
