"""One real megatron-core operation per CPU patch: each raises on CPU without its patch.

Run by patch_probe.py, which reverts one patch at a time. A check returns normally when the
operation works and asserts that the result is right, not only that nothing raised.
"""
import torch

from tests.platform.tiny_gpt import batch, build_gpt, forward_backward, gpt_config, init_distributed


def check_current_device() -> None:
    from megatron.core.utils import GlobalMemoryBuffer

    buffer = GlobalMemoryBuffer().get_tensor((4, 3), torch.float32, "probe")
    assert buffer.device.type == "cpu" and buffer.shape == (4, 3)


def check_cuda_rng() -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():  # the TP state is seeded with seed + 2718 + tp_rank
        forked = torch.rand(4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(5 + 2718))
    assert torch.equal(forked, expected), "the tracker's fork did not switch the CPU generator"
    assert torch.equal(torch.get_rng_state(), before), "fork did not restore the CPU generator"


def check_schedule_device_cuda() -> None:
    loss = forward_backward(build_gpt(gpt_config()), batch())  # schedules: device="cuda"
    assert loss > 0


def check_cuda_calls_stay_on_cpu() -> None:
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"


def check_sequence_parallel_torch_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = gpt_config()
    config.sequence_parallel = True  # TP=1 refuses SP at construction; the norm reads the flag
    norm = WrappedTorchNorm(config=config, hidden_size=64, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def check_cuda_streams() -> None:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # a class-level cache: start fresh
    loss = forward_backward(build_gpt(gpt_config(moe=True)), batch())
    assert loss > 0


def optimizer_step(bf16: bool) -> None:
    """Megatron DDP + megatron optimizer take one clipped step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = gpt_config()
    config.bf16, config.params_dtype = bf16, torch.bfloat16 if bf16 else torch.float32
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), build_gpt(config))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=bf16, clip_grad=1e-3), [model])
    before = [p.detach().float().clone() for p in model.parameters()]
    forward_backward(model, batch())
    updated, grad_norm, _ = optimizer.step()
    assert updated and grad_norm > 1e-3, "expected a clipped step"
    assert any(not torch.equal(b, p.float()) for b, p in zip(before, model.parameters()))


def check_fp32_optimizer_clip_grads() -> None:
    optimizer_step(bf16=False)


def check_bf16_optimizer_wrapper() -> None:
    optimizer_step(bf16=True)


# torchrun (2 processes) checks ------------------------------------------------------------

def check_cuda_synchronize() -> None:
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    comm = P2PCommunicator(torch.distributed.group.WORLD, ModelParallelConfig())
    first = torch.distributed.get_rank() == 0
    sent = torch.empty(3, 5, 7)
    recv_prev_shape, _ = comm._communicate_shapes(
        sent if first else None, None, recv_prev=not first, recv_next=False)
    if not first:
        assert recv_prev_shape == [3, 5, 7], recv_prev_shape


def check_all_to_all_split_sizes() -> None:
    init_distributed(tp=1, ep=2, etp=1)
    try:
        loss = forward_backward(build_gpt(gpt_config(ep=2, etp=1, moe=True)), batch())
        assert loss > 0
    finally:
        init_distributed(tp=2)


UNEVEN_SIZES = [3, 5]


def check_uneven_all_gather() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    group = parallel_state.get_tensor_model_parallel_group()
    rank, sizes = group.rank(), UNEVEN_SIZES
    mine = torch.full((sizes[rank], 2), float(rank + 1))
    gathered = gather_from_sequence_parallel_region(mine, group=group, output_split_sizes=sizes)
    assert torch.equal(gathered, torch.cat([torch.full((n, 2), float(r + 1)) for r, n in enumerate(sizes)]))


def check_uneven_reduce_scatter() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

    group = parallel_state.get_tensor_model_parallel_group()
    rank, sizes = group.rank(), UNEVEN_SIZES
    full = torch.arange(16.0).reshape(8, 2) * (rank + 1)
    scattered = reduce_scatter_to_sequence_parallel_region(full, group=group, input_split_sizes=sizes)
    start = sum(sizes[:rank])
    assert torch.equal(scattered, (torch.arange(16.0).reshape(8, 2) * 3)[start:start + sizes[rank]])


def check_recompute() -> None:
    """Full activation recompute re-runs each layer's forward inside the backward pass."""
    config = gpt_config()
    config.recompute_granularity, config.recompute_method, config.recompute_num_layers = "full", "uniform", 1
    loss = forward_backward(build_gpt(config), batch())
    assert loss > 0


# patch name -> the operations that need it; None: operations that work with no patch of
# their own (watched so that a torch/megatron upgrade that breaks them shows up here)
SINGLE_PROCESS = {
    "current_device": [check_current_device],
    "cuda_rng": [check_cuda_rng],
    "cuda_device_mode": [check_schedule_device_cuda, check_cuda_calls_stay_on_cpu],
    "sequence_parallel_torch_norm": [check_sequence_parallel_torch_norm],
    "cuda_streams": [check_cuda_streams],
    "cuda_tensor_type_names": [check_fp32_optimizer_clip_grads, check_bf16_optimizer_wrapper],
    "recompute_device_mode": [check_recompute],
}
TWO_PROCESSES = {
    "cuda_synchronize": [check_cuda_synchronize],
    "all_to_all_split_sizes": [check_all_to_all_split_sizes],
    "uneven_gloo_collectives": [check_uneven_all_gather],
    None: [check_uneven_reduce_scatter],
}
