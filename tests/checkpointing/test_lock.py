"""One run per checkpoint folder (issue 11.3): the lock, its holder's name, and a crashed holder."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from megaswift.checkpointing.layout import CheckpointError, read_latest
from megaswift.checkpointing.lock import LOCK_FILE, CheckpointFolderLock, hold_checkpoint_folder
from tests.torchrun import child_env
from tests.train.runner import pt_flags, run_pt, steps_logged, wait_for


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with CheckpointFolderLock(tmp_path / "ckpt"):
        with pytest.raises(CheckpointError) as refused:
            CheckpointFolderLock(tmp_path / "ckpt").acquire()
    message = str(refused.value)
    assert f"is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "another checkpoint.save" in message
    # Released on exit: the next run takes it, and finds no trace of an unclean end.
    lock = CheckpointFolderLock(tmp_path / "ckpt")
    assert lock.acquire() == {}
    lock.release()


_HOLD = """
import sys, time
from megaswift.checkpointing.lock import CheckpointFolderLock
CheckpointFolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_taken_over_and_reported(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid} on host"):
            CheckpointFolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The kernel dropped the dead holder's lock; its record is left, and reported by the next holder.
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == holder.pid
    with hold_checkpoint_folder(folder):
        said = capsys.readouterr().out
        assert f"previous run on this folder (pid {holder.pid} on host" in said
        assert "ended without releasing its lock" in said
    assert (folder / LOCK_FILE).read_text() == ""  # a clean release leaves no record


def test_second_run_on_a_checkpoint_folder_is_refused(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = subprocess.Popen(
        [sys.executable, "-m", "megaswift", "pt",
         *pt_flags(demo_data, tmp_path / "first", train__train_iters=10_000, checkpoint__save=ckpt,
                   checkpoint__save_interval=2)],
        env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (ckpt / "latest").is_file(), first)
        second = run_pt(pt_flags(demo_data, tmp_path / "second", train__train_iters=10_000, checkpoint__save=ckpt),
                        check=False)
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGTERM)  # it saves the step it is in and ends
        assert first.wait(timeout=120) == 0, first.stderr.read()[-4000:]
    assert second.returncode == 2, second.stderr[-4000:]
    assert f"checkpoint.save folder {ckpt} is in use by another run: pid {first.pid} on host" in second.stderr
    assert not (tmp_path / "second" / "metrics.jsonl").exists()  # it trained nothing
    # The first run kept the folder to itself: `latest` is its last logged step.
    assert read_latest(ckpt) == steps_logged(tmp_path / "first")
