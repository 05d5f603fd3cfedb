"""On-disk layout of megaswift checkpoints, shared by training and conversion.

    CKPT_DIR/
      latest                  iteration number of the newest COMPLETE checkpoint (written last, atomically)
      iter_0000006/           a megatron-core dist_checkpointing (torch_dist) checkpoint, layout-free on disk
        megaswift.json        format, iteration, the HF config, the run config, what the checkpoint contains
        hf_assets/            tokenizer + generation config files, copied verbatim (for export)

A checkpoint is written to `iter_0000006.tmp-<nonce>/` and renamed into place when complete; `latest` is
then replaced atomically. A crash mid-save therefore leaves the previous checkpoint as `latest`, and an
orphaned temporary folder that the next run holding the folder's lock (lock.py) removes. The nonce makes two
writers' temporaries distinct even where the lock cannot hold (a folder shared without working locks).
The state dict keys: "model" (one GPTModel) or "model0", "model1", ... (virtual pipeline chunks) holding
megatron-core's sharded_state_dict(); "optimizer", "scheduler", "iteration" when training state is saved.
"""
import json
import os
import re
import shutil
import uuid
from pathlib import Path

FORMAT = "megaswift-mcore/1"
META_FILE = "megaswift.json"
HF_ASSETS = "hf_assets"
LATEST_FILE = "latest"
# Files that travel with a model between HF and megatron folders, unchanged.
HF_ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                  "generation_config.json")


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


# Leftovers of an interrupted save: `iter_N.tmp-<nonce>` (and `iter_N.tmp` from before nonces), and the
# temporary file write_latest renames over `latest`.
_TEMPORARY_NAME = re.compile(r"^(iter_\d{7}\.tmp(-[0-9a-f]+)?|\." + LATEST_FILE + r"\.[0-9a-f]+)$")
_ITERATION_NAME = re.compile(r"^iter_(\d{7})$")


def new_nonce() -> str:
    return uuid.uuid4().hex[:8]


def temporary_dir(final: Path, nonce: str | None = None) -> Path:
    return final.with_name(f"{final.name}.tmp-{nonce or new_nonce()}")


def is_temporary_name(name: str) -> bool:
    """True for what an unfinished save leaves in a checkpoint root (a temporary folder or `latest` file)."""
    return bool(_TEMPORARY_NAME.match(name))


def remove_orphaned_temporaries(root: str | Path) -> list[Path]:
    """Deletes what interrupted saves left in `root`; returns what was removed. Only the holder of the
    folder's lock may call this: anyone else could delete a running save's folder."""
    root = Path(root)
    removed = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if is_temporary_name(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def complete_iterations(root: str | Path) -> list[int]:
    """Iterations in `root` whose folder is complete (renamed into place, with its META_FILE), oldest first."""
    root = Path(root)
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = _ITERATION_NAME.match(entry.name)
        if match and (entry / META_FILE).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def previous_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete iter_* folder beside `ckpt_dir` with a smaller iteration, or None."""
    match = _ITERATION_NAME.match(ckpt_dir.name)
    if not match:
        return None
    older = [i for i in complete_iterations(ckpt_dir.parent) if i < int(match.group(1))]
    return iteration_dir(ckpt_dir.parent, older[-1]) if older else None


def read_latest(root: str | Path) -> int | None:
    """The newest complete iteration in `root`, or None when there is none."""
    latest = Path(root) / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest}: expected an iteration number, found {text!r}")
    if not (iteration_dir(root, int(text)) / META_FILE).is_file():
        raise CheckpointError(f"{latest} names iteration {text}, but {iteration_dir(root, int(text))} "
                              f"is missing or has no {META_FILE}")
    return int(text)


def write_latest(root: str | Path, iteration: int) -> None:
    latest = Path(root) / LATEST_FILE
    tmp = latest.with_name(f".{LATEST_FILE}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, latest)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accepts a checkpoint root (uses `latest`) or an iter_* folder; returns the iter_* folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    iteration = read_latest(path)
    if iteration is None:
        # Megatron-LM, Megatron-Bridge and ms-swift name `latest` so (megaswift/checkpointing/foreign.py).
        foreign = (path / "latest_checkpointed_iteration.txt").is_file() or (path / ".metadata").is_file()
        raise CheckpointError(f"{path} is not a megaswift checkpoint: it has neither {META_FILE} nor a "
                              f"{LATEST_FILE} file" + (
                                  ". It is laid out as Megatron-LM writes checkpoints: export it with `megaswift "
                                  "convert mcore2hf PATH OUT --hf-config CONFIG`, or train from its weights with "
                                  "--checkpoint.finetune --model.hf_config CONFIG" if foreign else ""))
    return iteration_dir(path, iteration)


def write_meta(ckpt_dir: Path, meta: dict) -> None:
    (ckpt_dir / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))


def read_meta(ckpt_dir: str | Path) -> dict:
    file = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: not a megaswift checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {meta.get('format')!r} is not supported; expected {FORMAT!r}")
    return meta


def copy_hf_assets(source_dir: str | Path | None, dest_dir: Path) -> list[str]:
    """Copies tokenizer/generation files found in `source_dir`; returns the names copied."""
    if not source_dir or not Path(source_dir).is_dir():
        return []
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_ASSET_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, dest_dir / name)
            copied.append(name)
    return copied
