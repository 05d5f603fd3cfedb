"""Installing says what it builds, once, and nothing else: pip runs setup.py three times (build requirements,
metadata, build), and torch's import-time notices (NumPy not installed yet, no CUDA runtime on a machine
without a GPU driver) are not about the build."""
import os
import subprocess
import sys

from tests.torchrun import REPO

# numpy blocked: pip builds megaswift before it installs numpy
RUN_SETUP = ("import runpy, sys; sys.modules['numpy'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
             "runpy.run_path('setup.py', run_name='__main__')")


def _setup(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MEGASWIFT_BUILD_EXT", "MEGASWIFT_BUILD_CUDA")}
    return subprocess.run([sys.executable, "-c", RUN_SETUP, *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**env, "PYTHONWARNINGS": "default"})


def test_metadata_runs_print_nothing_but_the_answer():
    proc = _setup("--name")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "megaswift"
    assert proc.stderr.strip() == "", proc.stderr


def test_the_build_run_says_once_what_it_builds():
    proc = _setup("build_ext", "--help")  # the build command's run, without compiling anything
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("megaswift setup.py: "), proc.stderr
    assert "CUDA kernels" in notes[0]
