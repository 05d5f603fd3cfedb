"""Atomic output: build in `OUT.tmp-<nonce>` beside OUT, rename into place only when complete."""
import contextlib
import shutil
from pathlib import Path

from converters.errors import ConversionError
from converters.verify import VerificationError
from megaswift.checkpointing.layout import temporary_dir


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    """Yields a temporary folder; on success it replaces `out`, on any error it is deleted."""
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out)
    tmp.mkdir()
    try:
        yield tmp
    except VerificationError:
        raise  # keep the unfinished folder (it has a `.tmp-` name) with its verification.json
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = temporary_dir(out.with_name(out.name + ".old"))
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
