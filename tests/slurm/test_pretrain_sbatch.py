"""`sbatch slurm/pretrain.sh` on the real one-node Slurm, CPU only: a signalled job saves and exits 0, and the
requeued job (SLURM_RESTART_COUNT=1) resumes from that checkpoint with the same command, to the end."""
from pathlib import Path

import pytest

from tests.launchers.pretrain_config import metrics, write_pretrain_config
from tests.slurm.cluster import REPO, not_ready_reason, signal_then_requeue

REASON = not_ready_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
TRAIN_ITERS = 40  # long enough that a signal sent at step 3 lands well before the end (steps take ~0.05-0.2 s)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from megaswift.data.demo import prepare_demo_data
    return prepare_demo_data(tmp_path_factory.mktemp("slurm-data"))


def metric_steps(folder: Path) -> list[int]:
    return [m["step"] for m in metrics(folder)]


def job_logs(folder: Path) -> str:
    parts = [f"--- {p.relative_to(folder)}\n{p.read_text()[-3000:]}" for p in sorted(folder.rglob("*.out"))]
    parts += [f"--- {p.relative_to(folder)}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("logs/*/*.log"))]
    return "\n".join(parts)


def test_signalled_job_saves_and_requeued_job_resumes(tmp_path, demo_data):
    config = write_pretrain_config(tmp_path, demo_data, TRAIN_ITERS, save=True)
    steps = lambda: metric_steps(tmp_path)  # noqa: E731
    job, stopped_at, first_run = signal_then_requeue(REPO / "slurm" / "pretrain.sh", config, tmp_path,
                                                     tmp_path / "ckpt", steps, TRAIN_ITERS,
                                                     lambda: job_logs(tmp_path), first_step_timeout=150,
                                                     run_timeout=120)
    assert f"stopped by signal after step {stopped_at}; checkpoint saved" in first_run
    batch_out = (tmp_path / f"megaswift-pt-{job}.out").read_text()
    assert f"job {job} restart 0" in batch_out and f"job {job} restart 1" in batch_out  # appended, not truncated
    assert metric_steps(tmp_path) == list(range(1, TRAIN_ITERS + 1)), "resumed run must continue the step count"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(TRAIN_ITERS)
    node_logs = list((tmp_path / "logs").glob(f"megaswift-pt-{job}/*.log"))
    assert len(node_logs) == 1 and "world size 2" in node_logs[0].read_text()
