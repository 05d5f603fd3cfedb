"""Is what is on disk what was saved? Per-file sizes and CRC32s, a load-time check, and two guards.

At save time every data file of a checkpoint gets its size and CRC32 recorded in megaswift.json ("files"),
computed by reading it back right after the write (from the page cache: 0.02 s for 100 MB, a tenth of the
save; each rank sums the `__<rank>_*.distcp` files it wrote, rank 0 the rest), or, where the writer summed
the bytes as it wrote them (converters/mcore_writer.py), taken from it. On load the same sums are
recomputed (the files spread over the ranks) before any tensor is read, so bytes that changed on disk (bit
rot, a partial copy, a truncated transfer) are named instead of being trained on. CRC32 is for accidents,
not for attackers. megatron-core's own manifest (`save(..., verify_integrity=True)`) is not used: it hashes
every file with SHA-256 on rank 0 alone (5x slower here, and serial in the checkpoint's size), keeps its
result apart from megaswift.json, and does not cover checkpoints written by the converters.

Also here: the checks that name a damaged file when a load fails without records (`find_damaged_file`),
and the refusal to save non-finite weights (`check_weights_finite`).
"""
import io
import pickle
import re
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megaswift.checkpointing.collective import all_gather, rank, say
from megaswift.checkpointing.layout import META_FILE, CheckpointError, previous_complete_checkpoint, read_meta

FILES_KEY = "files"
_CHUNK = 8 << 20
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def checksum_file(path: Path) -> dict:
    """{"size": bytes, "crc32": 8 hex digits}, reading `path` in chunks into one reused buffer."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            size += count
    return {"size": size, "crc32": f"{crc:08x}"}


def data_files(folder: Path) -> list[str]:
    """The files whose bytes make the checkpoint: every top-level file but megaswift.json (which holds the
    records) and the folders (hf_assets/ is copied verbatim from the HF folder)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != META_FILE)


def _writer_rank(name: str, world_size: int) -> int:
    """torch_dist names each rank's data file `__<rank>_<n>.distcp`; everything else is rank 0's."""
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match and int(match.group(1)) < world_size else 0


def _summed_or_read(path: Path, summed: dict | None) -> dict:
    """The sum taken while `path` was written, if its size still matches the file's; else read it back."""
    if summed is not None and summed["size"] == path.stat().st_size:
        return {"size": summed["size"], "crc32": summed["crc32"]}
    return checksum_file(path)


def record_files(folder: Path, summed: dict[str, dict] | None = None) -> dict:
    """Size and CRC32 of every data file of a just-written checkpoint, each file summed by the rank that
    wrote it. `summed`: {name: {"size", "crc32"}} this rank computed while writing files (the converters'
    writer does), used instead of reading those files back. Collective; every rank gets the whole record."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    summed = summed or {}
    mine = {name: _summed_or_read(folder / name, summed.get(name)) for name in data_files(folder)
            if _writer_rank(name, world_size) == rank()}
    merged = {}
    for part in all_gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def _check_one(folder: Path, name: str, recorded: dict) -> str | None:
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    found = checksum_file(path)
    if found["size"] != recorded["size"]:
        return f"{path} has {found['size']} bytes, {recorded['size']} were written"
    if found["crc32"] != recorded["crc32"]:
        return (f"{path} has changed since it was written (CRC32 {found['crc32']}, recorded "
                f"{recorded['crc32']}; same size)")
    return None


def verify_files(folder: Path, records: dict) -> list[str]:
    """What differs between `folder` and its records, one line per damaged file ([] when intact). The files
    are split over the ranks; collective, every rank gets the whole list."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    names = sorted(records)
    mine = [_check_one(folder, name, records[name]) for i, name in enumerate(names) if i % world_size == rank()]
    return sorted(problem for part in all_gather(mine) for problem in part if problem)


def find_damaged_file(folder: Path) -> str | None:
    """After a load failed with no records to check: which file cannot be read, or None. Reads every item
    torch_dist's index (.metadata) lists, where it says it is, as the loader would (weights_only)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / ".metadata").is_file():
        return f"{folder / '.metadata'} is missing"
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to parse the index means the index is damaged
        return f"{folder / '.metadata'} cannot be read ({type(e).__name__}: {_first_line(e)})"
    if (folder / "common.pt").is_file():  # megatron-core before 0.19 kept the common state apart
        try:
            torch.load(folder / "common.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            return f"{folder / 'common.pt'} cannot be read ({type(e).__name__}: {_first_line(e)})"
    for index, item in sorted(metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        path = folder / item.relative_path
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < item.offset + item.length:
            return (f"{path} is truncated: it has {path.stat().st_size} bytes, the index places {index.fqn} at "
                    f"bytes {item.offset}..{item.offset + item.length}")
        with open(path, "rb") as f:
            f.seek(item.offset)
            blob = f.read(item.length)
        try:
            if index.fqn in metadata.state_dict_metadata and not _is_bytes_item(metadata, index.fqn):
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            return f"{path} is damaged: {index.fqn} at byte {item.offset} cannot be read ({_first_line(e)})"
    return None


def _is_bytes_item(metadata, fqn: str) -> bool:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    return isinstance(metadata.state_dict_metadata[fqn], BytesStorageMetadata)


def _first_line(error: Exception) -> str:
    """The error's first line, unless it is torch's advice to retry with weights_only=False: bytes that do not
    unpickle as tensors are damaged, and unpickling them without the guard is never the fix."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return type(error).__name__ if not line or "weights" in line.lower() else line


# What torch raises when a file's bytes are not what it wrote (zip container, pickle, truncation).
_DAMAGE_ERRORS = (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, OSError)


def is_damage_error(error: BaseException) -> bool:
    return isinstance(error, (*_DAMAGE_ERRORS, TorchCheckpointException))


def check_weights_finite(chunks: list, iteration: int) -> None:
    """Refuses (every rank alike) to save weights holding NaN or Inf: such a checkpoint poisons every resume.
    Cheap: one sum per local parameter and one all-reduce."""
    names = []
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if not torch.isfinite(param.detach().sum(dtype=torch.float32)):
                names.append(name if len(chunks) == 1 else f"model{index}.{name}")
    flag = torch.tensor([float(len(names))])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(_collective_device())
        dist.all_reduce(flag)
    if float(flag.item()) == 0:
        return
    where = [f"rank {r}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}"
             for r, n in enumerate(all_gather(names)) if n]
    raise CheckpointError(
        f"refusing to save the checkpoint of step {iteration}: the weights hold NaN or Inf ({'; '.join(where)}). "
        f"Training diverged before this step; `latest` still names the last good checkpoint. Resume from it "
        f"with a lower train.lr, more warmup (train.lr_warmup_iters) or gradient clipping (train.clip_grad)")


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def damaged_checkpoint_message(ckpt_dir: Path, iteration, problems: list[str], previous: Path | None) -> str:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if previous is not None:
        advice = (f"The previous complete checkpoint is {previous} (iteration {int(previous.name[5:])}): rerun with "
                  f"--checkpoint.fallback true to resume from it, or restore the damaged file from a copy")
    else:
        advice = f"There is no earlier complete checkpoint in {ckpt_dir.parent}; restore the file from a copy"
    return f"checkpoint {ckpt_dir} (iteration {iteration}) is damaged: {shown}. {advice}"


def damaged_files(ckpt_dir: Path) -> list[str]:
    """The damaged files of `ckpt_dir` ([] when intact, or when it records no sums, as older checkpoints
    do). Collective."""
    from megaswift.checkpointing.foreign import is_foreign_checkpoint
    if is_foreign_checkpoint(ckpt_dir):  # written by Megatron-LM & co., which record no sums
        return []
    records = read_meta(ckpt_dir).get(FILES_KEY)
    return verify_files(ckpt_dir, records) if records else []


def intact_checkpoint(ckpt_dir: Path, fallback: bool) -> Path:
    """`ckpt_dir` when its files match their sums. Otherwise, with `fallback`, the newest earlier complete
    checkpoint that is intact (said on rank 0); without, a CheckpointError naming the damaged files and the
    previous complete checkpoint. Collective."""
    problems = damaged_files(ckpt_dir)
    if not problems:
        return ckpt_dir
    previous = previous_complete_checkpoint(ckpt_dir)
    if fallback and previous is not None:
        say(f"checkpoint {ckpt_dir} is damaged ({problems[0]}{' ...' if len(problems) > 1 else ''}); falling back "
            f"to the previous complete one, {previous} (checkpoint.fallback)")
        return intact_checkpoint(previous, fallback)
    raise CheckpointError(damaged_checkpoint_message(ckpt_dir, read_meta(ckpt_dir).get("iteration"), problems,
                                                     previous))


def read_naming_damage(read: Callable[[], object], ckpt_dir: Path):
    """`read()`, with the bare errors torch gives for damaged bytes (EOFError, "PytorchStreamReader failed
    reading zip archive", an unpickling error that suggests weights_only=False) turned into a CheckpointError
    that names the file, the iteration and the previous complete checkpoint. Other errors pass unchanged."""
    try:
        return read()
    except CheckpointError:
        raise
    except (Exception, TorchCheckpointException) as error:  # the latter is a BaseException
        if not is_damage_error(error):
            raise
        problem = find_damaged_file(ckpt_dir)
        if problem is None:
            raise
        raise CheckpointError(damaged_checkpoint_message(ckpt_dir, read_meta(ckpt_dir).get("iteration"), [problem],
                                                         previous_complete_checkpoint(ckpt_dir))) from None
