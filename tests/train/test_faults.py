"""Signals, crashes mid-save and diverging losses: what users rely on when things go wrong."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from megaswift.checkpointing.layout import read_latest, resolve_checkpoint
from tests.torchrun import REPO
from tests.train.runner import losses, pt_flags, run_pt


def _start_pt(flags):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "megaswift", "pt", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def _steps_logged(out: Path) -> int:
    file = out / "metrics.jsonl"
    if not file.is_file():
        return 0
    return sum(1 for line in file.read_text().splitlines() if line.endswith("}") and '"loss"' in line)


def test_sigterm_finishes_step_saves_and_exits_zero(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = _start_pt(pt_flags(demo_data, tmp_path, train__train_iters=10_000, checkpoint__save=ckpt))
    _wait_for(lambda: _steps_logged(tmp_path) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-4000:]
    last = max(losses(tmp_path))
    assert read_latest(ckpt) == last  # the checkpoint holds exactly the last finished step
    assert last < 10_000


def _kill_during_a_save(demo_data, tmp_path, ckpt, attempts: int = 5) -> list:
    """SIGKILL the run while a checkpoint folder is still temporary; returns those folders. A kill can land
    just after the rename, so try again (the next run resumes from `latest`) until one lands mid-save."""
    for attempt in range(attempts):
        proc = _start_pt(pt_flags(demo_data, tmp_path / f"run{attempt}", train__train_iters=10_000,
                                  checkpoint__save=ckpt, checkpoint__save_interval=1))
        _wait_for(lambda: (ckpt / "latest").exists(), proc)
        known = {p.name for p in ckpt.iterdir()}
        _wait_for(lambda: any(p.name.endswith(".tmp") and p.name not in known for p in ckpt.iterdir()), proc)
        proc.kill()
        proc.wait(timeout=30)
        in_progress = [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
        if in_progress:
            return in_progress
    raise AssertionError(f"no kill landed during a save in {attempts} attempts")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    in_progress = _kill_during_a_save(demo_data, tmp_path, ckpt)
    latest = read_latest(ckpt)
    assert f"iter_{latest:07d}.tmp" not in {p.name for p in in_progress}
    # Resuming from the folder continues from the last complete checkpoint.
    out2 = tmp_path / "resumed"
    run_pt(["--checkpoint.save", str(ckpt), "--logging.output_dir", str(out2),
            "--train.train_iters", str(latest + 1)])
    assert list(losses(out2)) == [latest + 1]
    assert resolve_checkpoint(ckpt).name == f"iter_{latest + 1:07d}"


def test_nan_loss_stops_with_step_number(demo_data, tmp_path):
    # An absurd learning rate blows the weights up: within a few steps the loss is no longer finite.
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=8, train__lr=1e30, train__lr_warmup_iters=0,
                           train__clip_grad=0), check=False)
    assert proc.returncode == 2
    match = re.search(r"loss is (nan|inf|-inf) at step (\d+); stopping \(set train.on_nan=skip", proc.stderr)
    assert match, proc.stderr[-3000:]
    logged = losses(tmp_path) if (tmp_path / "metrics.jsonl").exists() else {}
    # Every step before the failing one was logged with a finite loss; the failing one was not trained.
    assert sorted(logged) == list(range(1, int(match.group(2))))
    assert all(math.isfinite(v) for v in logged.values())


def test_nan_loss_skip_counts_skipped_batches(demo_data, tmp_path):
    run_pt(pt_flags(demo_data, tmp_path, train__train_iters=6, train__lr=1e30, train__lr_warmup_iters=0,
                    train__clip_grad=0, train__on_nan="skip"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # the run went on to the end
    non_finite = 0
    for record in records:
        non_finite += not math.isfinite(record["loss"])
        assert record["skipped_batches"] == non_finite
    assert non_finite >= 1


def test_switching_optimizer_kind_on_resume_is_a_clear_error(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_pt(pt_flags(demo_data, tmp_path / "first", train__train_iters=2, train__exit_after_iters=1,
                    checkpoint__save=ckpt))
    proc = run_pt(["--checkpoint.save", str(ckpt), "--logging.output_dir", str(tmp_path / "second"),
                   "--parallel.distributed_optimizer", "true"], check=False)
    assert proc.returncode == 2
    assert "saved with parallel.distributed_optimizer=false, but this run uses parallel.distributed_optimizer=true" \
        in proc.stderr
    assert read_latest(ckpt) == 1  # nothing was overwritten
