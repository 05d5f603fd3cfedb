"""bf16 with pipeline parallelism (megatron's non-distributed Float16 optimizer) saves, resumes and continues
as an uninterrupted run does.

One run covers the two ways that save failed (checkpointing/state.py): the param groups mix bf16 weights
with the fp32 weights megatron-core's torch norms keep ("Param id 9 does not match any model sharded param"
at the first save; tiny-qwen2's bf16 q/k/v biases share the no-weight-decay group with the fp32 norms, the
case where a wrong slot->weight map would pair tensors wrongly), and virtual-pipeline chunks whose
weights were lost when their state dicts were merged into one."""
from megaswift.checkpointing.layout import read_latest
from tests.train.runner import losses, pt_flags, run_pt

TOTAL = 4
BF16_PP2_VPP2 = {"train__precision": "bf16", "parallel__pipeline": 2, "parallel__virtual_pipeline": 2,
                 "model__preset": "tiny-qwen2"}


def test_bf16_pipeline_resume_matches_straight_run(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    # One run saving at step 2 gives both the straight losses and the checkpoint to resume.
    run_pt(pt_flags(demo_data, tmp_path / "straight", train__train_iters=TOTAL, checkpoint__save=ckpt,
                    checkpoint__save_interval=2, **BF16_PP2_VPP2), nproc=2)
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
