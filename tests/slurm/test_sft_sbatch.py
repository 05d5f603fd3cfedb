"""`sbatch slurm/sft.sh` on the real one-node Slurm, CPU only, with the example config (examples/sft/) pointed at
tiny files: a fine-tune seeded by `checkpoint.load ... finetune` is signalled, saves and exits 0; the requeued job
runs the same command and resumes from checkpoint.save (not from the seed again), continuing with no step missing
or repeated."""
import json
from pathlib import Path

import pytest
import yaml

from tests.slurm.cluster import REPO, not_ready_reason, signal_then_requeue
from tests.slurm.test_pretrain_sbatch import job_logs
from tests.torchrun import run_torchrun
from tests.train.test_sft import _write_alpaca

REASON = not_ready_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
TRAIN_ITERS = 24  # a signal sent at step 3 lands well before the end


def metric_steps(save: Path) -> list[int]:
    """Steps in metrics.jsonl, which logging.output_dir puts beside the checkpoints by default."""
    path = save / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def write_sft_config(folder: Path, tokenizer: Path) -> Path:
    """examples/sft/tiny_agent.yaml with its paths and sizes pointed at a tiny seed checkpoint and dataset."""
    data = _write_alpaca(folder / "train.jsonl", count=16)
    run_torchrun(["-m", "megaswift", "sft", "--data.datasets", data, "--data.tokenizer", tokenizer,
                  "--data.cache_dir", folder / "cache", "--train.train_iters", "0", "--checkpoint.save",
                  folder / "seed", "--checkpoint.save_initial", "true", "--logging.output_dir", folder / "seed_logs",
                  "--logging.progress_bar", "false"], nproc=1, timeout=240)
    config = yaml.safe_load((REPO / "examples" / "sft" / "tiny_agent.yaml").read_text())
    config["checkpoint"].update(load=str(folder / "seed"), save=str(folder / "ckpt"), save_interval=0)
    config["data"].update(datasets=[str(data)], seq_length=64, packing=False, loss_scale="default",
                          cache_dir=str(folder / "cache"))
    config["train"].update(micro_batch_size=1, global_batch_size=4, train_iters=TRAIN_ITERS)
    config["logging"] = {"progress_bar": False, "tensorboard": False}
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_signalled_sft_job_saves_and_requeued_job_resumes_without_gap_or_repeat(tmp_path, demo_data):
    config = write_sft_config(tmp_path, demo_data[0])
    save = tmp_path / "ckpt"
    steps = lambda: metric_steps(save)  # noqa: E731
    _, stopped_at, _ = signal_then_requeue(REPO / "slurm" / "sft.sh", config, tmp_path, save, steps, TRAIN_ITERS,
                                           lambda: job_logs(tmp_path), first_step_timeout=240, run_timeout=180)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*/*.log")))
    assert f"starting from the weights of {tmp_path / 'seed' / 'iter_0000000'} at step 0" in logs
    assert f"resuming from {save / f'iter_{stopped_at:07d}'} at step {stopped_at} of {TRAIN_ITERS}" in logs
    assert metric_steps(save) == list(range(1, TRAIN_ITERS + 1)), "the requeued run must continue the step count"
    assert (save / "latest").read_text().strip() == str(TRAIN_ITERS)
