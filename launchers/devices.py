"""How many processes a node runs: one per GPU it can see, or a set number (CPU runs, tests)."""
import os
from collections.abc import Callable, Mapping

from launchers.errors import LaunchError


# Present where a GPU driver is loaded: NVIDIA's (CUDA) or AMD's kernel driver (ROCm, which torch.cuda covers).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/kfd")


def cuda_device_count(driver_paths: tuple[str, ...] = GPU_DRIVER_PATHS) -> int:
    """GPUs torch can see. Without a GPU driver there are none, and torch (1.4 s of imports in a process that
    then becomes torchrun, which imports it again) is not asked."""
    if not any(os.path.exists(path) for path in driver_paths):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_device_count(env: Mapping[str, str]) -> tuple[int, str] | None:
    """GPUs named by the environment (Slurm's allocation, then CUDA_VISIBLE_DEVICES), with the source."""
    gpus_on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus_on_node:
        if not gpus_on_node.isdigit():
            raise LaunchError(f"SLURM_GPUS_ON_NODE: expected a number, found {gpus_on_node!r}")
        return int(gpus_on_node), "SLURM_GPUS_ON_NODE"
    if "CUDA_VISIBLE_DEVICES" in env:
        names = [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        # CUDA stops at the first invalid id, and -1 is the usual way to hide every GPU
        return (0 if names[:1] == ["-1"] else len(names)), "CUDA_VISIBLE_DEVICES"
    return None


def processes_per_node(env: Mapping[str, str], requested: int | None,
                       gpu_count: Callable[[], int] = cuda_device_count) -> tuple[int, str]:
    """(processes per node, where that number came from).

    Order: the flag, NPROC_PER_NODE, the GPUs on the node; one process on a node without GPUs.
    Asking for more processes than there are GPUs is an error, since two ranks would share a device.
    """
    found = visible_device_count(env)
    if found is None:
        count = gpu_count()
        found = (count, "torch.cuda.device_count()")
    gpus, gpu_source = found
    if requested is not None:
        chosen, source = requested, "--nproc-per-node"
    elif env.get("NPROC_PER_NODE", "").strip():
        text = env["NPROC_PER_NODE"].strip()
        if not text.isdigit():
            raise LaunchError(f"NPROC_PER_NODE: expected a positive number, found {text!r}")
        chosen, source = int(text), "NPROC_PER_NODE"
    elif gpus > 0:
        return gpus, gpu_source
    else:
        return 1, f"no GPU found ({gpu_source} = 0): one CPU process; set NPROC_PER_NODE for more"
    if chosen < 1:
        raise LaunchError(f"{source}: expected at least 1 process per node, found {chosen}")
    if 0 < gpus < chosen:
        raise LaunchError(f"{source} = {chosen} processes per node, but this node has {gpus} GPU(s) "
                          f"({gpu_source}): ranks would share GPUs. Ask Slurm for {chosen} GPUs per node "
                          f"(--gpus-per-node={chosen}) or launch {gpus} processes per node.")
    return chosen, source
