"""Bad input to `megaswift pt` exits non-zero with a message naming the setting, before any training."""
import os
import subprocess
import sys

import pytest

from tests.torchrun import REPO


def _pt(*flags):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megaswift", "pt", *flags], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("flags, message", [
    (["--model.preset", "gpt-5"], "unknown model preset 'gpt-5'; available: ["),
    (["--data.paths", "/nonexistent/data"], "/nonexistent/data.bin does not exist"),
    (["--data.paths", "x", "--parallel.tensor", "3"], "world size 1 is not divisible by parallel.tensor"),
    (["--checkpoint.load", "/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt does not exist"),
])
def test_bad_input_is_a_clear_error(flags, message, tmp_path):
    proc = _pt(*flags, "--logging.output_dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_section():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "megaswift", "pt", "--help"], capture_output=True, text=True,
                         timeout=60, env=env).stdout
    for flag in ("--parallel.tensor", "--train.lr", "--checkpoint.save", "--data.paths", "--config"):
        assert flag in out
