"""Stopping and resuming changes nothing: losses after a resume equal those of an uninterrupted run."""
import json

import pytest

from megaswift.checkpointing.layout import META_FILE, read_latest
from tests.torchrun import REPO
from tests.train.runner import PT_COMMAND, losses, pt_flags, run_pt

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




def _train_saving_midway(demo_data, tmp_path, nproc, layout: dict, command=PT_COMMAND) -> tuple[dict, object]:
    """TOTAL steps saving at step 3: the losses of a straight run, and the step-3 checkpoint to resume."""
    out, ckpt = tmp_path / "straight", tmp_path / "ckpt"
    run_pt(pt_flags(demo_data, out, train__train_iters=TOTAL, checkpoint__save=ckpt, checkpoint__save_interval=3,
                    **layout), nproc=nproc, command=command)
    return losses(out), ckpt / "iter_0000003"


def _resume(ckpt_dir, out, layout: dict, nproc: int, check: bool = True):
    """Resumes `ckpt_dir` (its recorded config, the layout overridden), saving into a folder of its own."""
    flags = ["--checkpoint.load", str(ckpt_dir), "--checkpoint.save", str(out / "ckpt"),
             "--logging.output_dir", str(out)]
    for key, value in layout.items():
        flags += [f"--{key.replace('__', '.')}", str(value)]
    return run_pt(flags, nproc=nproc, check=check)


DIST_OPT = {"parallel__distributed_optimizer": "true"}


MOE = {"model__preset": "tiny-mixtral"}


@pytest.mark.parametrize("saved, resumed", [({"parallel__tensor": 2}, {"parallel__tensor": 1}),
                                            ({"parallel__pipeline": 2}, {"parallel__pipeline": 1})],
                         ids=["tp2-to-tp1", "pp2-to-pp1"])
def test_resume_distributed_optimizer_at_another_layout(demo_data, tmp_path, saved, resumed):
    """The distributed optimizer's state reshards across TP/PP, not only DP: Adam moments and steps survive."""
    straight, ckpt_dir = _train_saving_midway(demo_data, tmp_path, 2, {**saved, **DIST_OPT})
    _resume(ckpt_dir, tmp_path / "resumed", {**resumed, **DIST_OPT}, nproc=1)
    after = losses(tmp_path / "resumed")
    assert sorted(after) == list(range(4, TOTAL + 1))
    for step in after:
        assert after[step] == pytest.approx(straight[step], rel=1e-5), (step, after, straight)


def test_old_distributed_optimizer_format_resumes_at_its_layout_and_refuses_another(demo_data, tmp_path):
    """Checkpoints written before fully_reshardable (dp_reshardable, no type recorded) still resume at the
    layout they were saved at; at another TP the load stops with a CheckpointError before reading tensors."""
    layout = {"parallel__tensor": 2, **DIST_OPT}
    legacy = (str(REPO / "tests" / "train" / "pt_legacy_optimizer_format.py"),)
    straight, ckpt_dir = _train_saving_midway(demo_data, tmp_path, 2, layout, command=legacy)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    assert meta.pop("distrib_optim_sharding_type") == "dp_reshardable"
    (ckpt_dir / META_FILE).write_text(json.dumps(meta))  # as megaswift wrote them: no type recorded

    _resume(ckpt_dir, tmp_path / "same", layout, nproc=2)
    assert losses(tmp_path / "same") == {step: straight[step] for step in range(4, TOTAL + 1)}

    refused = _resume(ckpt_dir, tmp_path / "refused", {"parallel__tensor": 1}, nproc=1, check=False)
    assert refused.returncode == 2, refused.stderr[-4000:]
    for expected in ("dp_reshardable", "tensor=2", "tensor=1", "checkpoint.finetune=true"):
        assert expected in refused.stderr, (expected, refused.stderr[-4000:])


def test_distributed_optimizer_refuses_ep2_checkpoint_at_ep1(demo_data, tmp_path):
    """EP=2 keeps expert parameters in an optimizer of their own, EP=1 does not: a clear error, not a KeyError."""
    _, ckpt_dir = _train_saving_midway(demo_data, tmp_path, 2, {"parallel__expert": 2, **MOE, **DIST_OPT})
    refused = _resume(ckpt_dir, tmp_path / "refused", {"parallel__expert": 1}, nproc=1, check=False)
    assert refused.returncode == 2, refused.stderr[-4000:]
    for expected in ("2 part(s)", "builds 1", "parallel.expert=2", "checkpoint.finetune=true"):
        assert expected in refused.stderr, (expected, refused.stderr[-4000:])
