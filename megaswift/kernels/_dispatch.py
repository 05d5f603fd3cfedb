"""Chooses between the compiled csrc ops and the torch references, and says which one runs.

The extension modules `megaswift._kernels_cpu` (C++/OpenMP; it defines the torch.ops.megaswift
schemas) and `megaswift._kernels_cuda` (CUDA kernels for the same ops) are built by setup.py;
importing one registers its kernels. Set MEGASWIFT_KERNELS=reference to force the torch references.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger("megaswift.kernels")

MODULE_FOR_DEVICE = {"cpu": "megaswift._kernels_cpu", "cuda": "megaswift._kernels_cuda"}
DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
# Public op -> the torch.ops.megaswift kernels it needs, and the devices it can run on
# (packing works on host lists whatever the training device is).
KERNELS_FOR_OP = {
    "loss_scaled_cross_entropy": ("cross_entropy_partials", "cross_entropy_backward_"),
    "pack_first_fit_decreasing": ("pack_first_fit_decreasing",),
}
DEVICES_FOR_OP = {"loss_scaled_cross_entropy": ("cpu", "cuda"), "pack_first_fit_decreasing": ("cpu",)}


@functools.cache
def load_extension(device_type: str) -> str | None:
    """None when the device's extension imported, else why not. Cached: each is imported once."""
    if os.environ.get("MEGASWIFT_KERNELS", "").lower() == "reference":
        return "MEGASWIFT_KERNELS=reference forces the torch reference"
    if device_type not in MODULE_FOR_DEVICE:
        return f"no csrc kernels for device type {device_type!r}"
    try:
        if device_type != "cpu":
            importlib.import_module(MODULE_FOR_DEVICE["cpu"])  # defines the op schemas
        importlib.import_module(MODULE_FOR_DEVICE[device_type])
    except ImportError as e:
        return (f"{MODULE_FOR_DEVICE[device_type]} is not built or does not import ({e}); build it with "
                f"`pip install -e . --no-build-isolation`")
    return None


def why_not_compiled(op: str, device_type: str) -> str | None:
    """None when `op` runs compiled on `device_type`, else the reason it does not."""
    reason = load_extension(device_type)
    if reason is not None:
        return reason
    for kernel in KERNELS_FOR_OP[op]:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"megaswift::{kernel}", DISPATCH_KEY[device_type]):
            return f"megaswift::{kernel} has no {DISPATCH_KEY[device_type]} kernel (stale build? rebuild csrc)"
    return None


@functools.cache
def _announce_fallback(op: str, device_type: str, reason: str) -> None:
    # functools.cache makes this fire once per (op, device, reason): announced, but not per step.
    logger.warning("megaswift.kernels: %s on %s uses the torch reference: %s", op, device_type, reason)


def extension_for(op: str, device_type: str):
    """torch.ops.megaswift when `op` runs compiled on `device_type`, else None (fallback announced)."""
    reason = why_not_compiled(op, device_type)
    if reason is None:
        return torch.ops.megaswift
    _announce_fallback(op, device_type, reason)
    return None


def kernel_report() -> dict[str, dict[str, str]]:
    """{op: {device: "csrc (<module>)" or "torch reference: <why>"}}, without announcing anything."""
    report: dict[str, dict[str, str]] = {}
    for op, devices in DEVICES_FOR_OP.items():
        report[op] = {}
        for device_type in devices:
            reason = why_not_compiled(op, device_type)
            report[op][device_type] = (f"csrc ({MODULE_FOR_DEVICE[device_type]})" if reason is None
                                       else f"torch reference: {reason}")
    return report
