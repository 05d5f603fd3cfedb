"""`megaswift launch` checks a megaswift pt/sft command for the launch's world size before it starts any
process (and in --dry-run): a bad layout or flag is one error line, with no torchrun banner, no worker output
and no ChildFailedError report."""
import subprocess
import sys
import time

import pytest

from megaswift.cli.preflight import megaswift_subcommand
from tests.torchrun import child_env
from tests.train.runner import pt_flags

BANNER = "megaswift launch: node 0 of 1"  # printed just before the launcher becomes torchrun


def _launch(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = child_env(OMP_NUM_THREADS="1", NPROC_PER_NODE="2")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megaswift", "launch", *args], capture_output=True, text=True,
                          timeout=180, env=env)
    return proc, time.monotonic() - began


def _assert_one_error_line_and_nothing_started(proc, starts: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(starts), proc.stderr[-3000:]
    for started in (BANNER, "ChildFailedError", "torch.distributed", "[rank", "Traceback"):
        assert started not in proc.stdout + proc.stderr


@pytest.mark.parametrize("dry_run", [False, True], ids=["launch", "dry_run"])
def test_bad_layout_is_one_line_before_any_process_starts(dry_run, demo_data, tmp_path):
    flags = pt_flags(demo_data, tmp_path / "logs") + ["--parallel.tensor", "4"]
    proc, seconds = _launch(*(["--dry-run"] if dry_run else []), "--", "megaswift", "pt", *flags)
    _assert_one_error_line_and_nothing_started(
        proc, "megaswift pt: error: world size 2 is not divisible by parallel.tensor x parallel.pipeline x "
              "parallel.context = 4 x 1 x 1 = 4")
    assert proc.stderr.rstrip().endswith("(megaswift launch checked this before starting any process)")
    assert seconds < 120, f"the check took {seconds:.0f} s"
    print(f"launch check: {seconds:.1f} s")


def test_dry_run_names_what_it_checked(demo_data, tmp_path):
    proc, _ = _launch("--dry-run", "--", "megaswift", "pt", *pt_flags(demo_data, tmp_path / "logs"),
                      "--parallel.tensor", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checked `megaswift pt` for world size 2 (data-parallel size 1)" in proc.stdout
    assert "-m megaswift pt" in proc.stdout.splitlines()[-1]


def test_mistyped_flag_of_the_launched_command_is_reported_before_starting():
    proc, _ = _launch("--", "megaswift", "pt", "--train.iters", "5")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == ("megaswift pt: error: unknown flag --train.iters (did you mean "
                                           "--train.train_iters?)")
    assert BANNER not in proc.stderr


@pytest.mark.parametrize("program, found", [
    (("-m", "megaswift", "pt", "--config", "a.yaml"), ("pt", ["--config", "a.yaml"])),
    (("-m", "megaswift", "sft"), ("sft", [])),
    (("-m", "megaswift", "convert", "hf2mcore"), None),  # not a training command: nothing to check
    (("train.py", "--lr", "1"), None),
    (("-m", "mypackage.train"), None),
])
def test_only_megaswift_training_commands_are_checked(program, found):
    assert megaswift_subcommand(program) == found
