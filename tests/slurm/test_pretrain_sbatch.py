"""`sbatch slurm/pretrain.sh` on the real one-node Slurm, CPU only: a signalled job saves and exits 0, and the
requeued job (SLURM_RESTART_COUNT=1) resumes from that checkpoint with the same command, to the end."""
import subprocess
from pathlib import Path

import pytest

from tests.launchers.pretrain_config import metrics, write_pretrain_config
from tests.slurm.cluster import REPO, job_env, job_fields, not_ready_reason, run, sbatch, wait_finished, wait_until

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
    # The script asks for 8 GPUs per node by default; this CPU cluster has none, so the test overrides it and
    # sets the processes per node through NPROC_PER_NODE, as a CPU user would.
    job = sbatch(["--gpus-per-node=0", "--time=10", "--export=ALL", f"--chdir={tmp_path}",
                  REPO / "slurm" / "pretrain.sh", config], cwd=tmp_path, env=job_env(NPROC_PER_NODE="2"))
    details = lambda: job_logs(tmp_path)  # noqa: E731
    try:
        wait_until(lambda: len(metric_steps(tmp_path)) >= 3, 150, "the job's third training step", details)
        # the pre-timeout signal path: SIGTERM to the batch shell only, which passes it to the training step
        assert run(["scancel", "--batch", "--signal=TERM", job]).returncode == 0
        first = wait_finished(job, 120, details=details)
        assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), details()
        stopped_at = metric_steps(tmp_path)[-1]
        assert 3 <= stopped_at < TRAIN_ITERS, f"the signal should stop training early; last step {stopped_at}"
        assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(stopped_at)
        assert (tmp_path / "ckpt" / f"iter_{stopped_at:07d}").is_dir()
        assert f"stopped by signal after step {stopped_at}; checkpoint saved" in details()

        assert run(["scontrol", "requeue", job]).returncode == 0  # same job, same command, no flag changed
        second = wait_finished(job, 180, restarts=1, details=details)
        assert (second["JobState"], second["ExitCode"], second["Restarts"]) == ("COMPLETED", "0:0", "1"), details()
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    batch_out = (tmp_path / f"megaswift-pt-{job}.out").read_text()
    assert f"job {job} restart 0" in batch_out and f"job {job} restart 1" in batch_out  # appended, not truncated
    assert metric_steps(tmp_path) == list(range(1, TRAIN_ITERS + 1)), "resumed run must continue the step count"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == str(TRAIN_ITERS)
    node_logs = list((tmp_path / "logs").glob(f"megaswift-pt-{job}/*.log"))
    assert len(node_logs) == 1 and "world size 2" in node_logs[0].read_text()
