"""Talking to the real Slurm brought up by .ci/slurm-up.sh: readiness, submission, polling (never `sbatch --wait`,
which backs off for about 10 s even for an instant job)."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def not_ready_reason() -> str | None:
    """Why the Slurm tests cannot run here, or None when a cluster answers with an idle node."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH: install and start a one-node Slurm with `bash .ci/slurm-up.sh`"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm did not answer ({e}): start it with `bash .ci/slurm-up.sh`"
    if "is UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
        return f"slurmctld is not up ({said}): run `bash .ci/slurm-up.sh`"
    if not {"idle", "mixed", "allocated"} & set(nodes.stdout.split()):
        return f"no usable Slurm node (states: {nodes.stdout.split()}): run `bash .ci/slurm-up.sh`"
    return None


def job_env(**extra: str) -> dict:
    """The submitter's environment, which sbatch passes on: this venv first on PATH, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            **extra}


def run(argv: list[str], timeout: float = 60, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout,
                          env=env or job_env(), cwd=cwd)


def sbatch(argv: list, cwd: Path, env: dict) -> str:
    done = run(["sbatch", "--parsable", *argv], env=env, cwd=cwd)
    assert done.returncode == 0, f"sbatch failed: {done.stderr}"
    return done.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict:
    done = run(["scontrol", "show", "job", "-o", job_id])
    assert done.returncode == 0, done.stderr
    return dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)


def wait_until(predicate, timeout: float, what: str, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()}")


def wait_finished(job_id: str, timeout: float, restarts: int = 0, details=lambda: "") -> dict:
    """Polls until the job (in its `restarts`-th run) has finished; returns its scontrol fields."""
    def finished():
        fields = job_fields(job_id)
        return fields if fields["JobState"] in FINISHED and int(fields["Restarts"]) >= restarts else None
    return wait_until(finished, timeout, f"job {job_id} (run {restarts}) to finish", details)


def signal_then_requeue(script: Path, config: Path, folder: Path, save: Path, steps, train_iters: int, details,
                        first_step_timeout: float, run_timeout: float) -> tuple[str, int, str]:
    """Submits `script config` on 2 CPU processes, sends the pre-timeout SIGTERM (to the batch shell only, which
    passes it to the training step) once `steps()` lists three steps, checks the job exited 0 early with its
    last step saved in `save`,
    requeues it (same job, same command) and waits for the requeued run to complete. Returns (job id, the step
    the first run stopped at, `details()` as it was after the first run)."""
    # The scripts ask for 8 GPUs per node by default; this CPU cluster has none, so the GPUs are overridden and
    # the processes per node set through NPROC_PER_NODE, as a CPU user would.
    job = sbatch(["--gpus-per-node=0", "--time=10", "--export=ALL", f"--chdir={folder}", script, config],
                 cwd=folder, env=job_env(NPROC_PER_NODE="2"))
    try:
        wait_until(lambda: len(steps()) >= 3, first_step_timeout, "the job's third training step", details)
        assert run(["scancel", "--batch", "--signal=TERM", job]).returncode == 0
        first = wait_finished(job, run_timeout, details=details)
        assert (first["JobState"], first["ExitCode"]) == ("COMPLETED", "0:0"), details()
        stopped_at = steps()[-1]
        assert 3 <= stopped_at < train_iters, f"the signal should stop training early; last step {stopped_at}"
        assert (save / "latest").read_text().strip() == str(stopped_at)
        assert (save / f"iter_{stopped_at:07d}").is_dir()
        first_run = details()
        assert run(["scontrol", "requeue", job]).returncode == 0
        second = wait_finished(job, run_timeout + 60, restarts=1, details=details)
        assert (second["JobState"], second["ExitCode"], second["Restarts"]) == ("COMPLETED", "0:0", "1"), details()
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    return job, stopped_at, first_run
