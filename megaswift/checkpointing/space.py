"""Disk space for checkpoints: how much a save needs, whether it fits, and a full disk said plainly.

When a disk fills mid-save, torch's zip writer reports `[enforce fail at inline_container.cc] unexpected pos`
and torch.distributed.checkpoint wraps it per rank: nothing says "disk full". `is_disk_full` recognises
the case (ENOSPC / EDQUOT anywhere in the chain, or a write failure with the filesystem then nearly full) so
callers can name the folder, what is free and what the save needs.
"""
import errno
import shutil
from pathlib import Path

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
# Where the errno is lost, what is said instead: torch's zip writer on a short write, and megatron-core's
# writer threads, which keep only the class of the error ("Worker failure: ... error: <class 'RuntimeError'>").
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed", "inline_container", "Worker failure")
NEARLY_FULL = 64 << 20  # bytes free below which a short write is taken as a full disk


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _chain(error: BaseException):
    """The error, its causes and contexts, and the per-rank failures torch.distributed.checkpoint collects."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            for failure in failures.values():
                todo += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                         if isinstance(f, BaseException)]
        for arg in getattr(e, "args", ()):  # some wrappers carry the original as an argument
            if isinstance(arg, BaseException):
                todo.append(arg)


def is_disk_full(error: BaseException, folder: Path) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(text in str(e) for text in _FULL_TEXT):
            return True
    short_write = any(text in str(e) for e in _chain(error) for text in _SHORT_WRITE_TEXT)
    return short_write and free_bytes(folder) < NEARLY_FULL


def not_enough_space(folder: Path, needed: int) -> str | None:
    """A message when `folder`'s filesystem has less than `needed` bytes free, else None."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"{folder} has {human_bytes(free)} free, and this needs about {human_bytes(needed)}")
