"""Run a script under torchrun on a free port with a hard timeout, so a hang fails a test instead of CI."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_path() -> str:
    """PYTHONPATH for child processes: this checkout first, then what the caller had (on the GPU
    machine, the folder tests/gpu/run.sh installs carried wheels into)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


# Rendezvous settings of the test process itself (an in-process group, an outer torchrun) must not leak
# into the runs a test starts: each run gets its own.
_RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                    "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def child_env(**extra: str) -> dict:
    """The environment for a run a test starts: the caller's, less its rendezvous settings, with this
    checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    return {**env, "PYTHONPATH": python_path(), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None,
                 cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`args` is what follows torchrun's own flags: a script path or `-m module`, then its arguments.
    `check=False` returns a failed run instead of raising (a timeout still raises)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *map(str, args)]
    full_env = {**child_env(OMP_NUM_THREADS="1"), **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-10000:]}")
    return proc


def run_commands_in_one_launch(command: str, runs_file: str | Path) -> int:
    """The body of a worker script started by run_torchrun: several `megaswift COMMAND` runs in ONE torchrun
    launch (a 2-process launch costs seconds of start-up each). `runs_file`: JSON, a list of flag lists. Each
    run is the real command (`megaswift.cli.<command>.run`); between runs only megatron-core's model-parallel
    groups are torn down: the process group torchrun set up stays (the trainer would destroy it, and a second
    rendezvous on the same port is not what is tested). Returns the first failing run's status, else 0."""
    import importlib
    import json

    from megatron.core import parallel_state

    import megaswift.train.trainer as trainer
    from megaswift.cli.main import parse_command_line
    cli = importlib.import_module(f"megaswift.cli.{command}")
    trainer.shutdown_distributed = parallel_state.destroy_model_parallel
    for flags in json.loads(Path(runs_file).read_text()):
        status = cli.run(parse_command_line([command, *flags]))
        if status:
            return status
    return 0
