"""bf16 with megatron's non-distributed Float16 optimizer saves, resumes and continues as an uninterrupted
run does, at pipeline (+ virtual pipeline) and at expert parallelism.

The PP=2 VPP=2 case covers the two ways that save failed (checkpointing/state.py): the param groups mix bf16
weights with the fp32 weights megatron-core's torch norms keep ("Param id 9 does not match any model sharded
param" at the first save; tiny-qwen2's bf16 q/k/v biases share the no-weight-decay group with the fp32
norms, where a wrong slot->weight map would pair tensors wrongly), and virtual-pipeline chunks whose weights
were lost when their state dicts were merged into one. The EP=2 MoE case chains two such optimizers (dense
and expert), whose parts are saved apart."""
import pytest

from megaswift.checkpointing.layout import read_latest
from tests.train.runner import losses, pt_flags, run_pt

TOTAL = 4
LAYOUTS = {"qwen2-pp2-vpp2": {"parallel__pipeline": 2, "parallel__virtual_pipeline": 2, "model__preset": "tiny-qwen2"},
           "mixtral-ep2": {"parallel__expert": 2, "model__preset": "tiny-mixtral"}}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_bf16_resume_matches_straight_run(demo_data, tmp_path, layout):
    ckpt = tmp_path / "ckpt"
    # One run saving at step 2 gives both the straight losses and the checkpoint to resume.
    run_pt(pt_flags(demo_data, tmp_path / "straight", train__train_iters=TOTAL, checkpoint__save=ckpt,
                    checkpoint__save_interval=2, train__precision="bf16", **layout), nproc=2)
    assert read_latest(ckpt) == TOTAL
    resumed = tmp_path / "resumed"
    run_pt(["--checkpoint.load", str(ckpt / "iter_0000002"), "--checkpoint.save", str(resumed / "ckpt"),
            "--logging.output_dir", str(resumed)], nproc=2)
    straight, after = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(after) == list(range(3, TOTAL + 1))
    # Bit-exact, not approximate: the resume restores the bf16 weights, the fp32 main copies and Adam's moments
    # and steps exactly, and replays the same batches in the same order on CPU, so nothing rounds differently.
    # Resuming from the bf16 weights alone (main copies lost) or without the moments changes these losses.
    assert after == {step: straight[step] for step in after}, (after, straight)
