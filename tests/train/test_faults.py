"""Signals, crashes mid-save and diverging losses: what users rely on when things go wrong."""
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from megaswift.checkpointing.layout import read_latest, resolve_checkpoint
from tests.torchrun import child_env
from tests.train.runner import losses, pt_flags, run_pt, steps_logged, wait_for


def _start_pt(flags):
    env = child_env(OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megaswift", "pt", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_finishes_step_saves_and_exits_zero(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = _start_pt(pt_flags(demo_data, tmp_path, train__train_iters=10_000, checkpoint__save=ckpt))
    wait_for(lambda: steps_logged(tmp_path) >= 2, proc)
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
        wait_for(lambda: (ckpt / "latest").exists(), proc)
        known = {p.name for p in ckpt.iterdir()}
        wait_for(lambda: any(".tmp" in p.name and p.name not in known for p in ckpt.iterdir()), proc)
        proc.kill()
        proc.wait(timeout=30)
        in_progress = [p for p in ckpt.iterdir() if ".tmp" in p.name and p.is_dir()]
        if in_progress:
            return in_progress
    raise AssertionError(f"no kill landed during a save in {attempts} attempts")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    in_progress = _kill_during_a_save(demo_data, tmp_path, ckpt)
    latest = read_latest(ckpt)
    assert not any(p.name.startswith(f"iter_{latest:07d}.tmp") for p in in_progress)
    # Resuming from the folder continues from the last complete checkpoint, and clears the killed save's folder.
    out2 = tmp_path / "resumed"
    proc = run_pt(["--checkpoint.save", str(ckpt), "--logging.output_dir", str(out2),
                   "--train.train_iters", str(latest + 1)])
    assert list(losses(out2)) == [latest + 1]
    assert resolve_checkpoint(ckpt).name == f"iter_{latest + 1:07d}"
    assert not any(p.exists() for p in in_progress)
    assert all(f"removed {p}, left by a checkpoint save that did not finish" in proc.stdout for p in in_progress)


# Issue 11: `--train.lr 1e6` makes the gradient norm NaN after a couple of steps, and every step after.
DIVERGING = {"train__lr": 1e6, "train__lr_warmup_iters": 0, "train__train_iters": 12, "checkpoint__save_interval": 1}


def _strict_json_records(out: Path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _saved_state(folder: Path, scratch: Path) -> dict:
    """A checkpoint's tensors and common state as torch.distributed.checkpoint reads them (one flat dict)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = scratch / f"{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=False)


def _tensors(state: dict) -> dict:
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _common(state: dict) -> dict:
    return next(value[0] for key, value in state.items() if key.startswith("common_state"))


def test_non_finite_step_stops_the_run_before_it_is_applied_or_saved(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_pt(pt_flags(demo_data, tmp_path, checkpoint__save=ckpt, **DIVERGING), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    match = re.search(r"step (\d+): the (loss|gradient norm) is (nan|inf); the step was not applied and nothing "
                      r"from it was saved \(train.on_nan=stop\)", proc.stderr)
    assert match, proc.stderr[-3000:]
    bad = int(match.group(1))
    assert bad >= 2  # some steps trained first, so there is a checkpoint from before it
    assert sorted(losses(tmp_path)) == list(range(1, bad))
    assert read_latest(ckpt) == bad - 1
    assert not any(p.name.startswith(f"iter_{bad:07d}") for p in ckpt.iterdir())
    saved = _tensors(_saved_state(ckpt / f"iter_{bad - 1:07d}", tmp_path))
    assert saved and all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


def test_skipped_steps_leave_the_state_as_it_was_and_the_consecutive_limit_stops(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_pt(pt_flags(demo_data, tmp_path, checkpoint__save=ckpt, train__on_nan="skip",
                           train__max_consecutive_skips=3, **DIVERGING), check=False)
    records = _strict_json_records(tmp_path)
    first = next(r["step"] for r in records if r["skipped_steps"] == 1)
    assert first >= 2
    # Three skips in a row are allowed; the fourth stops the run, naming it and the limit.
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"step {first + 3}: the gradient norm is nan; the step was not applied: 4 steps in a row " \
           f"(steps {first}-{first + 3}) could not be applied, more than train.max_consecutive_skips=3" in proc.stderr
    assert [r["step"] for r in records] == list(range(1, first + 3))
    assert [r["skipped_steps"] for r in records] == [0] * (first - 1) + [1, 2, 3]
    skipped = records[first - 1:]
    assert all(r["grad_norm"] is None for r in skipped)  # NaN is written as null
    assert len({r["lr"] for r in skipped}) == 1  # the schedule does not advance on a skipped step
    # Every skipped step was saved (its batch is consumed) with exactly the state from before the first skip.
    assert read_latest(ckpt) == first + 2
    before = _saved_state(ckpt / f"iter_{first - 1:07d}", tmp_path)
    after = _saved_state(ckpt / f"iter_{first + 2:07d}", tmp_path)
    weights_before, weights_after = _tensors(before), _tensors(after)
    assert weights_before.keys() == weights_after.keys() and any("exp_avg" in key for key in weights_after)
    assert all(torch.equal(weights_before[key], weights_after[key]) for key in weights_before)
    assert all(torch.isfinite(t).all() for t in weights_after.values() if t.is_floating_point())
    assert _common(after)["scheduler"]["num_steps"] == first - 1 and _common(after)["iteration"] == first + 2


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
