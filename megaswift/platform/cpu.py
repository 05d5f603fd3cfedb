"""Make megatron-core 0.19 run on a machine without a GPU (CPU tensors, gloo).

megatron-core assumes CUDA throughout. Each patch below is one small function
that fixes one error seen on CPU; its docstring quotes the error and names the
megatron-core call site. `PATCHES` maps names to patches so tests can apply and
revert them one at a time, which is how we learn when an upgrade of
megatron-core makes a patch unneeded (see tests/platform/).

Two ways to apply them, both no-ops on a machine with CUDA; both patch the
attributes megatron-core looks up at call time (module globals, class
attributes, `torch.cuda.*`), so they work before or after `import megatron.core`:
- `with cpu_patches():` for library code (the converters): every patch it applied
  is undone on exit, so a caller's torch is unchanged afterwards. Patches already
  applied when it starts are left in place.
- `apply_cpu_patches()` for megaswift's own entry points (a training process):
  applied for the rest of the process, before models or optimizers are built.

Thread note: the cuda->cpu device mapping is a torch function mode, and function
modes are thread-local. `apply_cpu_patches()` enters it for the calling thread
(the one that should build models and run schedules and optimizer steps);
another thread that runs megatron code must wrap its work in
`with cpu_device_mode():`. Backward passes of CPU graphs run in the calling
thread, so they are covered.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

CPU = torch.device("cpu")

PATCHES: dict[str, Callable[[], None]] = {}
# name -> undo functions of an applied patch, newest last (see revert_patch).
_UNDO: dict[str, list[Callable[[], None]]] = {}
_MISSING = object()


def _patch(name: str):
    """Register a patch under `name`; applying it twice does nothing."""
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        def apply_once() -> None:
            if name not in _UNDO:
                _UNDO[name] = []
                fn()
        apply_once.__name__, apply_once.__doc__ = fn.__name__, fn.__doc__
        PATCHES[name] = apply_once
        return apply_once
    return register


def _replace(patch_name: str, owner: Any, attr: str, value: Any) -> None:
    original = owner.__dict__.get(attr, _MISSING)

    def undo() -> None:
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)

    setattr(owner, attr, value)
    _UNDO[patch_name].append(undo)


def revert_patch(name: str) -> None:
    """Undo one applied patch (tests use this to show a patch is still needed)."""
    for undo in reversed(_UNDO.pop(name, [])):
        undo()


def applied_patches() -> list[str]:
    return [name for name in PATCHES if name in _UNDO]


# --------------------------------------------------------------------------- devices

@_patch("current_device")
def patch_current_device() -> None:
    """`RuntimeError: Found no NVIDIA driver on your system` (older torch: `AssertionError:
    Torch not compiled with CUDA enabled`) from `device=torch.cuda.current_device()`, used
    throughout megatron-core (tensor_parallel.mappings, utils.GlobalMemoryBuffer, p2p, ...).
    Fix: `torch.cuda.current_device()` returns the cpu device."""
    _replace("current_device", torch.cuda, "current_device", lambda: CPU)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare ordinal means cuda:N


class CudaToCpuMode(TorchFunctionMode):
    """Map device="cuda" (or an ordinal) to cpu in every torch call; `.cuda()` is a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = CPU
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], CPU, *args[2:])
        return func(*args, **kwargs)


_MODE_BY_THREAD: dict[int, CudaToCpuMode] = {}


@contextlib.contextmanager
def cpu_device_mode():
    """Enter the cuda->cpu function mode in this thread (needed in threads other than the
    one that called apply_cpu_patches)."""
    with CudaToCpuMode():
        yield


@_patch("cuda_device_mode")
def patch_cuda_device_mode() -> None:
    """`RuntimeError: Found no NVIDIA driver on your system` from literal `device="cuda"` in
    the pipeline schedules (`total_num_tokens = torch.zeros([], device="cuda")` in
    pipeline_parallel.schedules), optimizer.clip_grads (`device='cuda'`), and `.cuda()` calls
    in the optimizers. Fix: a TorchFunctionMode that maps cuda devices to cpu, entered for the
    calling thread (function modes are thread-local; see the module docstring)."""
    _enter_mode_for_this_thread()
    _UNDO["cuda_device_mode"].append(_exit_mode_for_this_thread)


def _enter_mode_for_this_thread() -> bool:
    """Pushes the mode on this thread's stack unless it is there; returns whether it pushed."""
    if threading.get_ident() in _MODE_BY_THREAD:
        return False
    mode = CudaToCpuMode()
    mode.__enter__()  # stays on this thread's mode stack until reverted
    _MODE_BY_THREAD[threading.get_ident()] = mode
    return True


def _exit_mode_for_this_thread() -> None:
    mode = _MODE_BY_THREAD.pop(threading.get_ident(), None)
    if mode is not None:
        mode.__exit__(None, None, None)


@_patch("cuda_synchronize")
def patch_cuda_synchronize() -> None:
    """`RuntimeError: Found no NVIDIA driver on your system` from `torch.cuda.synchronize()` in
    pipeline_parallel.p2p_communication (`_communicate_shapes`, `_communicate`) and in
    dist_checkpointing (fully_parallel, async_utils). Fix: no-op on CPU."""
    _replace("cuda_synchronize", torch.cuda, "synchronize", lambda device=None: None)


# --------------------------------------------------------------------------- RNG

def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


class _DropForkedCpuRngWarning(logging.Filter):
    """With CUDA RNG routed to the CPU generator, megatron's tracker warns on every fork that
    draws random numbers ('CPU RNG state changed within GPU RNG context'): expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@_patch("cuda_rng")
def patch_cuda_rng() -> None:
    """`RuntimeError: Found no NVIDIA driver on your system` from `torch.cuda.get_rng_state()`
    in tensor_parallel.random (`CudaRNGStatesTracker.add` via `model_parallel_cuda_manual_seed`,
    `fork`, activation checkpointing). `torch.cuda.manual_seed` and megatron's
    `_set_cuda_rng_state` do not fail but are queued by `torch.cuda._lazy_call` and never run,
    so the tracker would silently not fork. Fix: route CUDA RNG get/set/seed to the CPU
    generator, which is what CPU dropout and init draw from."""
    from megatron.core.tensor_parallel import random as mcore_random

    for owner in (torch.cuda, torch.cuda.random):
        _replace("cuda_rng", owner, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        _replace("cuda_rng", owner, "set_rng_state",
                 lambda new_state, device="cuda": torch.set_rng_state(new_state))
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all (left alone: it queues).
        _replace("cuda_rng", owner, "manual_seed",
                 lambda seed: torch.default_generator.manual_seed(int(seed)))
    _replace("cuda_rng", mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _replace("cuda_rng", mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    rng_filter = _DropForkedCpuRngWarning()
    logger = logging.getLogger(mcore_random.__name__)
    logger.addFilter(rng_filter)
    _UNDO["cuda_rng"].append(lambda: logger.removeFilter(rng_filter))


# --------------------------------------------------------------------------- streams

class InertEvent:
    """Stands in for torch.cuda.Event on CPU, where work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return 0.0


class InertStream:
    """Stands in for torch.cuda.Stream on CPU, where work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else InertEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = InertStream()


@_patch("cuda_streams")
def patch_cuda_streams() -> None:
    """`torch.AcceleratorError: CUDA error: CUDA driver version is insufficient for CUDA runtime
    version` (with a CPU build of torch: `torch.cuda.Stream requires CUDA support`) from
    `MoEAlltoAllTokenDispatcher.__init__` (`torch.cuda.Stream()`), and the driver error from
    `torch.cuda.current_stream()` / `torch.cuda.stream(...)` in its `_maybe_dtoh_and_synchronize`.
    Fix: inert Stream/Event stand-ins; CPU work is synchronous, so there is nothing to order."""
    for attr, value in (("Stream", InertStream), ("Event", InertEvent),
                        ("current_stream", lambda device=None: _DEFAULT_STREAM),
                        ("default_stream", lambda device=None: _DEFAULT_STREAM),
                        ("stream", lambda stream=None: contextlib.nullcontext())):
        _replace("cuda_streams", torch.cuda, attr, value)


# --------------------------------------------------------------------------- norms

@_patch("sequence_parallel_torch_norm")
def patch_sequence_parallel_torch_norm() -> None:
    """`AssertionError: sequence parallel not supported by torch LayerNorm` from
    `transformer.torch_norm.WrappedTorchNorm`, the norm of the local (non-TE) layer spec.
    Fix: build the torch norm anyway and tag its parameters `sequence_parallel=True`, so
    `distributed.finalize_model_grads` all-reduces their grads over the TP group, as it does
    for TE norms."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def new_with_sequence_parallel(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        plain_config = copy.copy(config)
        plain_config.sequence_parallel = False
        norm = original_new(cls, plain_config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    _replace("sequence_parallel_torch_norm", WrappedTorchNorm, "__new__",
             staticmethod(new_with_sequence_parallel))


# --------------------------------------------------------------------------- collectives

def _as_int_list(sizes: Any) -> Any:
    if isinstance(sizes, torch.Tensor) or hasattr(sizes, "tolist"):
        return [int(s) for s in sizes.tolist()]
    return sizes


@_patch("all_to_all_split_sizes")
def patch_all_to_all_split_sizes() -> None:
    """`TypeError: all_to_all_single(): incompatible function arguments` from
    `tensor_parallel.mappings._AllToAll.forward`: the MoE alltoall dispatcher converts its split
    sizes to numpy only for CUDA tensors (`moe_utils.maybe_move_tensor_to_cpu`), so on CPU they
    arrive as tensors. Fix: convert split sizes to lists of ints before the collective."""
    from megatron.core.tensor_parallel.mappings import _AllToAll

    original_forward = _AllToAll.forward

    def forward_with_list_splits(ctx, group, input, output_split_sizes, input_split_sizes,
                                 use_nccl_stream=False):
        return original_forward(ctx, group, input, _as_int_list(output_split_sizes),
                                _as_int_list(input_split_sizes), use_nccl_stream)

    _replace("all_to_all_split_sizes", _AllToAll, "forward", staticmethod(forward_with_list_splits))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def gather_uneven_first_dim(input_: torch.Tensor, group, output_split_sizes: list[int]) -> torch.Tensor:
    """All-gather rows of different counts per rank with equal-size collectives (gloo has none
    for uneven sizes): pad to the largest count, gather, drop the padding."""
    longest = max(output_split_sizes)
    gathered = [input_.new_empty((longest, *input_.shape[1:])) for _ in output_split_sizes]
    torch.distributed.all_gather(gathered, _pad_rows(input_, longest), group=group)
    return torch.cat([part[:n] for part, n in zip(gathered, output_split_sizes)], dim=0)


@_patch("uneven_gloo_collectives")
def patch_uneven_gloo_collectives() -> None:
    """`RuntimeError: ProcessGroupGloo::allgather: invalid tensor size at index 1 (expected ...)`
    from `tensor_parallel.mappings._gather_along_first_dim(..., output_split_sizes)` (gloo has no
    uneven all-gather), reached by the MoE alltoall dispatcher with expert TP > 1. Fix: pad,
    gather, slice when split sizes are given. The uneven reduce-scatter works on gloo with
    torch 2.14, so it is left alone (tests/platform checks both)."""
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        return gather_uneven_first_dim(input_, group, _as_int_list(output_split_sizes))

    _replace("uneven_gloo_collectives", mappings, "_gather_along_first_dim", gather_along_first_dim)


# --------------------------------------------------------------------------- optimizer checks

_original_tensor_type = torch.Tensor.type


def _type_with_cuda_names(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):  # a name we reported: stay on cpu
        dtype = "torch." + dtype[len("torch.cuda."):]
    if dtype is not None or kwargs:
        return _original_tensor_type(self, dtype, non_blocking, **kwargs)
    name = _original_tensor_type(self)
    if self.device.type == "cpu" and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


@_patch("cuda_tensor_type_names")
def patch_cuda_tensor_type_names() -> None:
    """`TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, torch.cuda.HalfTensor,
    or torch.cuda.BFloat16Tensor. Received torch.FloatTensor` from
    `optimizer.optimizer.Float16OptimizerWithFloat16Params` and `optimizer.distrib_optimizer`,
    and a bare `AssertionError` from `optimizer.clip_grads.clip_grad_by_total_norm_fp32`
    (`param.grad.type() == 'torch.cuda.FloatTensor'`). Fix: `Tensor.type()` (no arguments)
    reports CPU tensors under the CUDA names these checks expect."""
    _replace("cuda_tensor_type_names", torch.Tensor, "type", _type_with_cuda_names)


# --------------------------------------------------------------------------- activation recompute

def _under_device_mode(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with cpu_device_mode():
            return fn(*args, **kwargs)
    return run


@_patch("recompute_device_mode")
def patch_recompute_device_mode() -> None:
    """`RuntimeError: Found no NVIDIA driver on your system` from `get_default_causal_mask`
    (`device="cuda"`) when activation recompute re-runs a layer's forward during backward
    (tensor_parallel.random `CheckpointFunction.backward`). The cuda->cpu function mode is not
    active there: the mode handles `Tensor.backward` / `torch.autograd.backward` itself, and a mode
    is popped while it handles a call, so the whole backward pass runs without it. Fix: the
    recompute enters the mode again. (`CheckpointWithoutOutput`, megatron-core's other recompute,
    needs Transformer Engine in 0.19 whatever its fp8 argument, so it never runs on a CPU.)"""
    from megatron.core.tensor_parallel.random import CheckpointFunction
    _replace("recompute_device_mode", CheckpointFunction, "backward",
             staticmethod(_under_device_mode(CheckpointFunction.__dict__["backward"].__func__)))


# --------------------------------------------------------------------------- entry points

def apply_cpu_patches() -> bool:
    """Apply every patch in PATCHES when CUDA is unavailable; return whether anything was
    patched. Idempotent. Enters the cuda->cpu function mode for the calling thread."""
    if torch.cuda.is_available():
        return False
    for patch in PATCHES.values():
        patch()
    if "cuda_device_mode" in _UNDO:
        _enter_mode_for_this_thread()  # a later call from another thread gets the mode too
    return True


@contextlib.contextmanager
def cpu_patches():
    """Applies every patch not applied yet (when CUDA is unavailable) for the body of the `with`, and
    undoes exactly those on exit, including the function mode it entered in this thread. Yields
    whether the patches are active. Library calls use this, so they leave the caller's process as
    they found it; patches applied before (an entry point's apply_cpu_patches) stay."""
    if torch.cuda.is_available():
        yield False
        return
    added = [name for name in PATCHES if name not in _UNDO]
    entered_mode = False
    try:
        for name in added:
            PATCHES[name]()
        # cuda_device_mode applied by another thread: this thread still needs its own mode
        entered_mode = "cuda_device_mode" not in added and _enter_mode_for_this_thread()
        yield True
    finally:
        if entered_mode:
            _exit_mode_for_this_thread()
        for name in reversed(added):
            revert_patch(name)
