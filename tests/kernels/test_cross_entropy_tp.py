"""Vocab-parallel loss-scaled cross entropy over TP=2 (torchrun, gloo) equals the unsplit result, padded
vocabularies included (padding on one rank, a rank of padding only)."""
from pathlib import Path

import pytest

from megaswift.kernels import _dispatch
from tests.torchrun import run_torchrun

WORKER = Path(__file__).with_name("tp_cross_entropy_worker.py")


@pytest.mark.slow
def test_tp2_vocab_parallel_equals_unsplit():
    proc = run_torchrun([WORKER], nproc=2, timeout=180)
    assert "TP cross entropy OK" in proc.stdout
    paths = ["reference"]
    if _dispatch.why_not_compiled("loss_scaled_cross_entropy", "cpu") is None:
        paths.append("csrc")
    for rank in (0, 1):
        for path in paths:
            for dtype in ("float32", "bfloat16"):
                for vocab_size in ("None", "1000"):
                    assert f"rank {rank} {path} torch.{dtype} vocab_local=517 vocab_size={vocab_size}: ok" \
                        in proc.stdout, proc.stdout
            assert f"rank {rank} {path} torch.float32 vocab_local=517 vocab_size=300: ok" in proc.stdout
