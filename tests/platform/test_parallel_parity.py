"""Tiny megatron-core GPTs at TP=2+SP, MoE EP=2 and MoE TP=2 with expert TP=2 on CPU (gloo,
2 processes) match a single-process run of the same weights: loss and every gradient to 1e-5.
The assertions live in parity_run.py; a mismatch fails the torchrun launch with its output."""
import pytest

from tests.platform.conftest import needs_cpu_only

pytestmark = [needs_cpu_only, pytest.mark.timeout(300)]


@pytest.mark.parametrize("mode", ["tp_sp", "moe_ep", "moe_etp"])
def test_parallel_matches_single_process(parity_output, mode):
    for rank in (0, 1):
        assert f"PARITY OK {mode} rank {rank}" in parity_output
