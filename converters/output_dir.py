"""Atomic output: build in `OUT.tmp-<nonce>` beside OUT, rename into place only when complete.

A conversion holds a flock on its temporary folder while it runs; the kernel drops it when the process
ends, however it ends. So a `OUT.tmp-*` folder nobody holds is the leftover of a conversion that was
killed (or failed its verification, which keeps the folder for inspection): the next conversion into OUT
reports and removes it, and leaves alone one that a running conversion holds.
"""
import contextlib
import errno
import fcntl
import os
import shutil
import sys
from pathlib import Path

from converters.errors import ConversionError
from converters.verify import VerificationError
from megaswift.checkpointing.layout import temporary_dir
from megaswift.checkpointing.space import folder_bytes, human_bytes, is_disk_full, not_enough_space


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")


def _lock_folder(folder: Path) -> int | None:
    """An exclusive flock on `folder` itself; the fd to keep (closing it releases), or None if held."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_orphaned_outputs(out: Path) -> list[Path]:
    """Removes the `OUT.tmp-*` folders no running conversion holds (and `OUT.old.tmp-*` ones once OUT is in
    place); says so on stderr; returns them."""
    removed = []
    leftovers = sorted(out.parent.glob(f"{out.name}.tmp-*")) if out.parent.is_dir() else []
    if out.is_dir():
        leftovers += sorted(out.parent.glob(f"{out.name}.old.tmp-*"))
    for folder in leftovers:
        if not folder.is_dir():
            continue
        fd = _lock_folder(folder)
        if fd is None:
            continue  # a conversion into the same OUT is running right now; its folder is not ours to take
        try:
            shutil.rmtree(folder)
        finally:
            os.close(fd)
        print(f"megaswift convert: removed {folder}, left by an earlier conversion into {out} that did not "
              f"finish (killed, or failed its verification)", file=sys.stderr)
        removed.append(folder)
    return removed


def _disk_full_error(out: Path, tmp: Path, needed: int | None) -> ConversionError:
    written = folder_bytes(tmp) if tmp.exists() else 0
    need = f"it needs about {human_bytes(needed)}" if needed else f"{human_bytes(written)} were written before it filled"
    return ConversionError(f"the disk holding {out.parent} ran out of space while writing {out} ({need}); the "
                           f"unfinished {tmp.name} was removed. Free space there or choose another output folder")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool, needed_bytes: int | None = None):
    """Yields a temporary folder; on success it replaces `out`, on any error it is deleted. `needed_bytes`
    (what the output will take, when known) is checked against the free space before anything is written."""
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_outputs(out)
    if needed_bytes:
        shortage = not_enough_space(out.parent, needed_bytes)
        if shortage:
            raise ConversionError(f"not converting into {out}: {shortage}. Free space there or choose another "
                                  f"output folder")
    tmp = temporary_dir(out)
    tmp.mkdir()
    lock = _lock_folder(tmp)  # ours: marks the folder as in use until this process ends
    try:
        try:
            yield tmp
        except VerificationError:
            raise  # keep the unfinished folder (it has a `.tmp-` name) with its verification.json
        except BaseException as e:
            full = is_disk_full(e, tmp)
            error = _disk_full_error(out, tmp, needed_bytes) if full else None
            shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error from e
            raise
        try:
            _move_into_place(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full_error(out, tmp, needed_bytes) from e
            raise
    finally:
        if lock is not None:
            os.close(lock)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = temporary_dir(out.with_name(out.name + ".old"))
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
