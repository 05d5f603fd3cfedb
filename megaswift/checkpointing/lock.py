"""One run at a time per checkpoint folder: an exclusive lock held for the run's lifetime.

Two runs saving into one folder overwrite each other's checkpoints and move `latest` backwards, and two
fresh ones collide on megatron-core's temporary file names. So a run takes `CKPT_DIR/.megaswift.lock` before
it resumes or saves, and keeps it until it ends.

The lock is the kernel's `flock` on that file, taken by global rank 0 only. The kernel drops it when the
holding process ends, however it ends (SIGKILL and crashes included), so a lock is never left behind by a
dead run. The file's text (host, pid, start time, command) only serves to name the holder; text found
under a free lock is the trace of a run that ended without releasing it (killed), and is reported.
On NFS, Linux implements flock with byte-range locks, which hold across nodes (a dead node's lock goes
with its lease); Lustre needs its `flock` mount option, else flock fails and the run says so.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from megaswift.checkpointing.collective import on_rank0_agreed, say
from megaswift.checkpointing.layout import CheckpointError, remove_orphaned_temporaries

LOCK_FILE = ".megaswift.lock"


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    command = " ".join(holder.get("command", []))
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({command})" if command else ""))


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": [text[:200]]}


class CheckpointFolderLock:
    """An exclusive, non-blocking lock on a checkpoint folder (created if missing). Not reentrant: a second
    lock object on the same folder is refused even in the same process, as a second run would be."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> dict:
        """Takes the lock; returns the record a holder that died without releasing it left ({} if none)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"checkpoint.save folder {self.folder} is in use by another run: {_describe(holder)}. Two runs "
                f"saving into one folder overwrite each other's checkpoints. Wait for that run to end or stop "
                f"it, or give this run another checkpoint.save. (The lock, {self.file}, is released by the "
                f"kernel when its holder exits, so it is never stale.)") from None
        except OSError as e:
            os.close(fd)
            raise CheckpointError(f"{self.file}: cannot lock it ({e.strerror}); the file system of "
                                  f"checkpoint.save must support flock (on Lustre: mount with -o flock)") from e
        stale = _read_holder(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": sys.argv,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return stale

    def release(self) -> None:
        """Clears the holder record (so the next run sees a clean release) and drops the lock. The file stays:
        unlinking a lock file lets a waiter lock the unlinked inode while a third run creates a new one."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _take(lock: CheckpointFolderLock) -> None:
    stale = lock.acquire()
    if stale:
        say(f"{lock.folder}: the previous run on this folder ({_describe(stale)}) ended without releasing "
            f"its lock (killed or crashed); taking the folder over")
    for path in remove_orphaned_temporaries(lock.folder):
        say(f"removed {path}, left by a checkpoint save that did not finish (the run was killed or failed)")


@contextlib.contextmanager
def hold_checkpoint_folder(folder: str | Path | None):
    """For a run's lifetime: rank 0 locks `folder` and clears leftovers of interrupted saves there; if the
    folder is taken, every rank raises the same CheckpointError. No-op for folder None (a run that saves
    nothing). Collective: call on every rank."""
    if folder is None:
        yield
        return
    lock = CheckpointFolderLock(folder)
    on_rank0_agreed(lambda: _take(lock), CheckpointError)
    try:
        yield
    finally:
        lock.release()
