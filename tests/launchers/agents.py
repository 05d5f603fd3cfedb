"""Start `megaswift launch` agents as real processes with a hard deadline, so a hung rendezvous fails a test."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "megaswift", "launch", *map(str, flags)]


def agent_env(extra: dict | None = None) -> dict:
    shape = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    # the outer environment (a Slurm job, a torchrun) must not leak a job shape into the test
    env = {k: v for k, v in os.environ.items() if k not in shape and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra or {})}


def run_agents(argvs: list[list[str]], timeout: float, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Runs every argv at once (each in its own session, so a timeout kills its torchrun workers too)."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=agent_env(env), start_new_session=True) for argv in argvs]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc, argv in zip(procs, argvs):
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out))
    except subprocess.TimeoutExpired:
        outputs = []
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            outputs.append(proc.communicate()[0])
        raise AssertionError(f"launch did not finish within {timeout}s:\n" + "\n---\n".join(outputs))
    return results
