"""Python front of csrc/: stable op names, each with a pure-torch reference and an announced fallback."""
from megaswift.kernels._dispatch import kernel_report
from megaswift.kernels.cross_entropy import loss_scaled_cross_entropy
from megaswift.kernels.cross_entropy_reference import loss_scaled_cross_entropy_reference
from megaswift.kernels.packing import (
    pack_first_fit_decreasing,
    pack_first_fit_decreasing_reference,
    packed_row_metadata,
)

__all__ = [
    "kernel_report",
    "loss_scaled_cross_entropy",
    "loss_scaled_cross_entropy_reference",
    "pack_first_fit_decreasing",
    "pack_first_fit_decreasing_reference",
    "packed_row_metadata",
]
