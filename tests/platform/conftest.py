"""Fixtures for the CPU-support tests: each runs megatron-core in fresh processes, because the
CPU patches are process-wide and must not leak into the pytest process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun import REPO, child_env, run_torchrun

HERE = Path(__file__).parent

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply only without CUDA")


def parse_lines(output: str, tag: str) -> list[dict]:
    return [json.loads(line[len(tag) + 1:]) for line in output.splitlines() if line.startswith(tag + " ")]


@pytest.fixture(scope="session")
def single_process_probe() -> str:
    proc = subprocess.run([sys.executable, str(HERE / "patch_probe.py")], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"patch_probe.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc.stdout


@pytest.fixture(scope="session")
def two_process_probe() -> str:
    return run_torchrun([HERE / "patch_probe.py", "--distributed"], nproc=2, timeout=180, cwd=REPO).stdout


@pytest.fixture(scope="session")
def parity_output() -> str:
    return run_torchrun([HERE / "parity_run.py", "--modes", "tp_sp", "moe_ep", "moe_etp"],
                        nproc=2, timeout=240, cwd=REPO).stdout
