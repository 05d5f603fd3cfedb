"""SIGTERM to the launched agent alone (Ctrl-less stop, a batch shell passing Slurm's signal) reaches the workers,
which stop cleanly; the launch then exits 0, not with torchrun's SignalException traceback."""
import os
import signal
import subprocess
import time

import pytest

from tests.launchers.agents import REPO, agent_env, launch_argv

PROBE = REPO / "tests" / "launchers" / "sigterm_probe.py"
pytestmark = pytest.mark.slow


def test_sigterm_to_the_agent_is_passed_to_every_worker(tmp_path):
    proc = subprocess.Popen(launch_argv("--nproc-per-node", 2, "--", PROBE, tmp_path), cwd=REPO, env=agent_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)  # the agent only: the launcher exec'd into it, same pid
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert [(tmp_path / f"stopped{r}").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"]
    assert "SignalException" not in out
