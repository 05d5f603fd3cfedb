"""Which old checkpoints to delete so a long run does not fill its disk (checkpoint.keep_last / keep_every).

Run only by the folder's lock holder, and only after a new checkpoint is complete and `latest` names it,
so a crash at any moment leaves at least the newest complete checkpoint. Iterations above `latest` are
never touched: they are from a run that went further before a resume from an older checkpoint (such as
checkpoint.fallback) and are replaced when this run reaches them.
"""
import shutil
from pathlib import Path

from megaswift.checkpointing.layout import complete_iterations, iteration_dir, read_latest


def iterations_to_delete(complete: list[int], latest: int, keep_last: int, keep_every: int) -> list[int]:
    """Of the `complete` iterations, those beyond the newest `keep_last` at or below `latest`, sparing every
    multiple of `keep_every`. keep_last 0 keeps everything."""
    if keep_last <= 0:
        return []
    candidates = sorted(i for i in complete if i <= latest)
    old = candidates[:-keep_last]
    return [i for i in old if not (keep_every > 0 and i % keep_every == 0)]


def bases_in_use(root: Path, iterations: list[int]) -> set[Path]:
    """The base checkpoints that the adapter checkpoints among `iterations` sit on (adapter.py)."""
    from megaswift.checkpointing.adapter import is_adapter_checkpoint, recorded_base_path
    from megaswift.checkpointing.layout import read_meta
    bases = set()
    for iteration in iterations:
        folder = iteration_dir(root, iteration)
        meta = read_meta(folder)
        if is_adapter_checkpoint(meta):
            bases.add(recorded_base_path(folder, meta).resolve())
    return bases


def apply_retention(root: str | Path, keep_last: int, keep_every: int) -> list[Path]:
    """Deletes the checkpoints `iterations_to_delete` names, except a base that a kept LoRA checkpoint sits on
    (a LoRA run saving into its base's folder); returns the folders removed."""
    latest = read_latest(root)
    if latest is None:
        return []
    complete = complete_iterations(root)
    doomed = iterations_to_delete(complete, latest, keep_last, keep_every)
    needed = bases_in_use(Path(root), [i for i in complete if i not in doomed])
    removed = []
    for iteration in doomed:
        folder = iteration_dir(root, iteration)
        if folder.resolve() in needed:
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def check_retention_settings(keep_last: int, keep_every: int) -> None:
    from megaswift.config import ConfigError
    for name, value in (("checkpoint.keep_last", keep_last), ("checkpoint.keep_every", keep_every)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a whole number >= 0 (0: off); found {value!r}")
