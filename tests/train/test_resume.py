"""Stopping and resuming changes nothing: losses after a resume equal those of an uninterrupted run."""
import pytest

from megaswift.checkpointing.layout import read_latest
from tests.train.runner import losses, pt_flags, run_pt

TOTAL = 6


def _straight_and_resumed(demo_data, tmp_path, nproc, first_layout: dict, resumed_layout: dict | None = None,
                          resumed_nproc: int | None = None):
    straight = tmp_path / "straight"
    run_pt(pt_flags(demo_data, straight, train__train_iters=TOTAL, **first_layout), nproc=nproc)
    resumed = tmp_path / "resumed"
    ckpt = tmp_path / "ckpt"
    run_pt(pt_flags(demo_data, resumed, train__train_iters=TOTAL, train__exit_after_iters=3, checkpoint__save=ckpt,
                    **first_layout), nproc=nproc)
    assert read_latest(ckpt) == 3
    # The second run names only the checkpoint folder: the rest of the config comes from the checkpoint.
    second = ["--checkpoint.save", str(ckpt), "--logging.output_dir", str(resumed)]
    for key, value in (resumed_layout or {}).items():
        second += [f"--{key.replace('__', '.')}", str(value)]
    run_pt(second, nproc=resumed_nproc or nproc)
    assert read_latest(ckpt) == TOTAL
    return losses(straight), losses(resumed)


def test_resume_is_bit_identical(demo_data, tmp_path):
    straight, resumed = _straight_and_resumed(demo_data, tmp_path, 1, {})
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    assert resumed == straight  # fp32 on CPU: exactly equal, not approximately


def test_resume_with_distributed_optimizer_is_bit_identical(demo_data, tmp_path):
    """Guards the shared-Adam-step trap: a resumed distributed optimizer must keep one step per parameter."""
    straight, resumed = _straight_and_resumed(demo_data, tmp_path, 2, {"parallel__distributed_optimizer": "true"})
    assert resumed == straight


def test_resume_tp2_checkpoint_at_tp1(demo_data, tmp_path):
    straight, resumed = _straight_and_resumed(demo_data, tmp_path, 2, {"parallel__tensor": 2},
                                              resumed_layout={"parallel__tensor": 1}, resumed_nproc=1)
    for step in range(1, TOTAL + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), (step, resumed, straight)
