"""Adapter checkpoints: what a LoRA/DoRA run saves, and the base checkpoint it sits on.

A LoRA run trains a few adapter tensors on a frozen base, so its checkpoints hold only what it trains (the
adapters, the `tuner.modules_to_save` weights, their optimizer state, schedule and RNG) and name the base:

    megaswift.json  "adapter": {"type": "lora", "tuner": {rank, alpha, ...},
                                "base": {"path": ".../converted/iter_0000000", "fingerprint": "sha256:...",
                                         "iteration": 0}}

The fingerprint is a sha256 over the base's recorded file sizes and CRC32s (integrity.py), so it costs no
read of the base's tensors, and any change to the base's bytes (another conversion, further training)
changes it. A relative `path` is relative to the adapter checkpoint's own folder: hf2mcore --adapter writes
`OUT/adapter/iter_0000000` with base `../../iter_0000000`, so the converted folder can move as a whole.

Parameter names: the adapters live in child modules called `adapter` of the linear layers they wrap
(megaswift/tuners), so every adapter tensor's state-dict name has an `.adapter.` component; the rest of
the model is the base.
"""
import hashlib
import json
from pathlib import Path

from megaswift.checkpointing.integrity import FILES_KEY, checksum_file, data_files
from megaswift.checkpointing.layout import CheckpointError, read_latest, read_meta, resolve_checkpoint

ADAPTER_KEY = "adapter"
ADAPTER_DIR = "adapter"  # beside a converted base: OUT/iter_0000000 (base), OUT/adapter/ (imported adapter)
# Tuner settings that define an adapter's tensors or its function; tuner.dropout may change on resume.
DEFINING_SETTINGS = ("type", "rank", "alpha", "rslora", "targets", "modules_to_save")


def is_adapter_tensor(name: str) -> bool:
    """True for a LoRA/DoRA tensor's state-dict name (lora_A, lora_B, magnitude), False for base weights."""
    return ".adapter." in f".{name}"


def is_adapter_checkpoint(meta: dict) -> bool:
    return bool(meta.get(ADAPTER_KEY))


def base_fingerprint(base_dir: Path, meta: dict | None = None) -> str:
    """sha256 over the base's data files' (name, size, CRC32), from the records in its megaswift.json (`meta`
    when the caller has read it; computed here for a checkpoint that records none)."""
    meta = meta if meta is not None else read_meta(base_dir)
    records = meta.get(FILES_KEY) or {name: checksum_file(base_dir / name) for name in data_files(base_dir)}
    listing = json.dumps({name: [r["size"], r["crc32"]] for name, r in sorted(records.items())}, sort_keys=True)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def base_record(base_dir: Path, path_text: str | None = None) -> dict:
    """What an adapter checkpoint records about its base; `path_text` overrides the absolute path (a relative
    path, for a converted folder that moves as a whole)."""
    meta = read_meta(base_dir)
    return {"path": path_text or str(Path(base_dir).resolve()), "fingerprint": base_fingerprint(base_dir, meta),
            "iteration": int(meta.get("iteration", 0))}


def adapter_meta(tuner: dict, base: dict) -> dict:
    """The megaswift.json entry of an adapter checkpoint: `tuner` as config_to_dict gives it."""
    return {ADAPTER_KEY: {"type": tuner["type"], "tuner": dict(tuner), "base": dict(base)}}


def recorded_tuner(meta: dict) -> dict:
    return dict(meta[ADAPTER_KEY]["tuner"])


def recorded_base_path(adapter_dir: Path, meta: dict) -> Path:
    path = Path(meta[ADAPTER_KEY]["base"]["path"])
    return path if path.is_absolute() else (Path(adapter_dir) / path).resolve()


def resolve_base(adapter_dir: Path, meta: dict | None = None) -> Path:
    """The base checkpoint an adapter checkpoint sits on, after checking it is the one it was trained on.
    A CheckpointError names both folders and what differs."""
    adapter_dir = Path(adapter_dir)
    meta = meta if meta is not None else read_meta(adapter_dir)
    record = meta[ADAPTER_KEY]["base"]
    base = recorded_base_path(adapter_dir, meta)
    if not base.is_dir():
        raise CheckpointError(
            f"{adapter_dir} holds a {meta[ADAPTER_KEY]['type']} adapter on the base checkpoint {record['path']} "
            f"(resolved: {base}), which does not exist: the adapter is useless without the weights it was trained "
            f"on. Put the base back at that path (a converted folder moves as a whole with its adapter/)")
    base_meta = read_meta(base)
    found = base_fingerprint(base, base_meta)
    if found != record["fingerprint"]:
        found_iteration = base_meta.get("iteration")
        raise CheckpointError(
            f"{adapter_dir} holds a {meta[ADAPTER_KEY]['type']} adapter trained on the base {base} as it was "
            f"(iteration {record.get('iteration')}, fingerprint {record['fingerprint']}), but {base} now holds "
            f"other weights (iteration {found_iteration}, fingerprint {found}: its files' sizes or CRC32s differ). "
            f"An adapter applies only to the exact weights it was trained on: restore that base, or start a new "
            f"adapter from this one")
    return base


def adapter_beside(base_dir: Path) -> Path | None:
    """The imported adapter that hf2mcore --adapter wrote beside a converted base (OUT/adapter/), or None."""
    folder = Path(base_dir).parent / ADAPTER_DIR
    try:
        return resolve_checkpoint(folder) if folder.is_dir() and read_latest(folder) is not None else None
    except CheckpointError:
        return None


def settings_differences(recorded: dict, tuner: dict) -> list[tuple[str, object, object]]:
    """(tuner.<name>, recorded, this run's) for each adapter-defining setting that differs."""
    return [(f"tuner.{key}", recorded.get(key), tuner.get(key)) for key in DEFINING_SETTINGS
            if _normalised(key, recorded.get(key)) != _normalised(key, tuner.get(key))]


def _normalised(key: str, value):
    if key == "targets" and isinstance(value, str) and value != "all-linear":
        return sorted(part.strip() for part in value.split(",") if part.strip())
    if key == "modules_to_save":
        return sorted(value or [])
    if key == "alpha" and value is not None:
        return float(value)
    return value
