"""A stop signal never loses a finished step, however the run was launched (issue 10 §3, §6).

Each case trains the tiny model on 2 processes, saves a checkpoint before the signal (the first save starts the
helper process of megatron-core's checkpoint writer, which a signal to the process group used to kill, so the
stop's own save died with BrokenPipeError), then signals: torchrun's agent, `megaswift launch`'s agent, or one
worker alone. Every rank must save and exit 0, and `latest` must be the last step the run logged.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megaswift.checkpointing.layout import read_latest
from tests.launchers.agents import REPO, agent_env, launch_argv
from tests.torchrun import free_port
from tests.train.runner import losses, pt_flags

pytestmark = pytest.mark.slow
RECORD_EXIT = REPO / "tests" / "launchers" / "record_exit.py"
SAVE_INTERVAL = 3


def _plain_torchrun_argv(*program) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *map(str, program)]


def _last_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return max(losses(out), default=0) if path.is_file() else 0


def _train_and_signal(tmp_path: Path, demo_data, launcher_argv, target: str) -> tuple[subprocess.Popen, str]:
    """Starts the run, waits until a checkpoint exists and training went on past it, signals `target`
    ("agent" or "worker1": the process of rank 1 only) with SIGTERM; returns the launcher and its output."""
    flags = pt_flags(demo_data, tmp_path, train__train_iters=10_000, checkpoint__save=tmp_path / "ckpt",
                     checkpoint__save_interval=SAVE_INTERVAL)
    proc = subprocess.Popen(launcher_argv(RECORD_EXIT, tmp_path, "pt", *flags), cwd=REPO, env=agent_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _last_logged(tmp_path) < SAVE_INTERVAL + 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)[0][-6000:]
            time.sleep(0.1)
        if target == "agent":
            os.kill(proc.pid, signal.SIGTERM)  # the agent alone (`megaswift launch` exec'd into it: same pid)
        else:
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if str(RECORD_EXIT) in p.cmdline()]
            rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
            assert len(workers) == 2 and len(rank1) == 1, [p.cmdline() for p in workers]
            rank1[0].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out


def _assert_every_rank_saved_the_last_step(tmp_path: Path, out: str) -> None:
    assert [(tmp_path / f"exit{rank}").read_text() for rank in (0, 1)] == ["0", "0"], out[-6000:]
    last = _last_logged(tmp_path)
    assert last > SAVE_INTERVAL
    assert read_latest(tmp_path / "ckpt") == last, out[-6000:]
    assert f"stop requested (SIGTERM); step {last} is the last one, saving it" in out


def test_sigterm_to_plain_torchrun_saves_the_last_step_on_every_rank(tmp_path, demo_data):
    proc, out = _train_and_signal(tmp_path, demo_data, _plain_torchrun_argv, "agent")
    _assert_every_rank_saved_the_last_step(tmp_path, out)
    # torchrun's agent itself re-raises the signal it got (SignalException, exit 1) after its workers exited 0:
    # docs/clusters.md says so, and why `megaswift launch` is the command to use where the exit code matters.
    assert proc.returncode == 1 and "SignalException" in out


def test_sigterm_to_megaswift_launch_saves_the_last_step_on_every_rank(tmp_path, demo_data):
    proc, out = _train_and_signal(tmp_path, demo_data, lambda *program: launch_argv(
        "--nproc-per-node", 2, "--", *program), "agent")
    _assert_every_rank_saved_the_last_step(tmp_path, out)
    assert proc.returncode == 0, out[-6000:]


def test_sigterm_to_one_worker_stops_every_rank_at_the_same_step(tmp_path, demo_data):
    # rank 1 alone is signalled; rank 0, which logs and finishes the checkpoint, must stop at the same step.
    proc, out = _train_and_signal(tmp_path, demo_data, _plain_torchrun_argv, "worker1")
    _assert_every_rank_saved_the_last_step(tmp_path, out)
    assert proc.returncode == 0, out[-6000:]
