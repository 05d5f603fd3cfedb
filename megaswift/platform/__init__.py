"""Where megaswift runs: the torch device and distributed backend, and CPU support for megatron-core."""
import torch

from megaswift.platform.cpu import apply_cpu_patches, cpu_device_mode, cpu_patches


def device() -> torch.device:
    """The device this process trains on: its current CUDA device, or the cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_backend() -> str:
    """torch.distributed backend for this machine: nccl with GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


__all__ = ["apply_cpu_patches", "cpu_device_mode", "cpu_patches", "device", "dist_backend"]
