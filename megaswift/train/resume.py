"""Where a run starts, and what may change when it resumes.

The rule (the same for pt, sft and every later trainer): a complete checkpoint in `checkpoint.save` always
wins and resumes the full state (weights, optimizer, schedule, consumed samples, RNG); `checkpoint.load`
(with `checkpoint.finetune`: weights only) seeds only a run whose `checkpoint.save` holds no checkpoint yet.
So rerunning the identical command (a Slurm requeue) continues the run instead of starting it over.

A resumed run's config is the recorded one under the YAML file and the flags (cli/run_config.py). Settings
that decide which sample comes next cannot change in mid-run (the position would point into other data);
everything else may, and the run says what changed. A checkpoint also defines the model: model flags that
contradict it are refused, dropout fields may be changed.
"""
from dataclasses import dataclass, field
from pathlib import Path

from megaswift.checkpointing.layout import read_latest, read_meta, resolve_checkpoint
from megaswift.config import ConfigError, ModelConfig, config_to_dict
from megaswift.models import resolve_hf_config

# Settings a resumed run may not change: each decides which sample the recorded position points at.
DATA_POSITION_SETTINGS = ("data.paths", "data.split", "data.seq_length", "data.datasets", "data.packing",
                          "data.over_length", "data.valid_fraction", "train.seed")
# Not part of what a run trains: where it writes, how it reports, a one-off stop, caches and workers.
NOT_COMPARED = ("checkpoint.", "logging.", "train.exit_after_iters", "data.cache_dir", "data.num_proc",
                "data.num_workers")
# HF config fields a checkpoint's model may change (they change training, not the weights' shapes).
COMPATIBLE_MODEL_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
# HF config fields that do not describe the network (ids, serialisation details).
NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
                    "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class StartPoint:
    """The checkpoint a run loads (None: random initialisation), how, and why."""
    folder: Path | None = None
    weights_only: bool = False
    resumed: bool = False  # full state from checkpoint.save (or from checkpoint.load without finetune)
    reason: str = ""
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def step(self) -> int:
        return int(self.meta.get("iteration", 0)) if self.resumed else 0

    def consumed_samples(self) -> int:
        """Recorded by the save; checkpoints from before that derive it from the recorded global batch."""
        if not self.resumed:
            return 0
        if "consumed_samples" in self.meta:
            return int(self.meta["consumed_samples"])
        recorded_batch = (self.meta.get("config") or {}).get("train", {}).get("global_batch_size")
        if recorded_batch is None:
            raise ConfigError(f"{self.folder}: megaswift.json records neither consumed_samples nor "
                              f"train.global_batch_size, so the data position of the resume is unknown")
        return self.step * int(recorded_batch)

    def recorded_config(self) -> dict:
        return (self.meta.get("config") or {}) if self.resumed else {}


def _has_checkpoint(save: str | None) -> bool:
    return bool(save) and Path(save).is_dir() and read_latest(save) is not None


def checkpoint_to_load(config) -> StartPoint:
    """Applies the resume rule (module docstring) to a run's checkpoint settings."""
    ck = config.checkpoint
    if _has_checkpoint(ck.save):
        folder = resolve_checkpoint(ck.save)
        why = f"checkpoint.save {ck.save} holds a complete checkpoint, which always wins"
        if ck.load:
            why += f"; checkpoint.load {ck.load} only seeds a run whose checkpoint.save is still empty"
        return StartPoint(folder, False, True, why, read_meta(folder))
    if ck.load:
        folder = resolve_checkpoint(ck.load)
        empty = f"checkpoint.save {ck.save} holds no checkpoint yet" if ck.save else "checkpoint.save is not set"
        how = "with checkpoint.finetune (weights only)" if ck.finetune else "without checkpoint.finetune (full state)"
        why = f"checkpoint.load {ck.load} {how}, and {empty}"
        return StartPoint(folder, ck.finetune, not ck.finetune, why, read_meta(folder))
    why = "no checkpoint.load, and " + (f"checkpoint.save {ck.save} holds no checkpoint yet" if ck.save
                                        else "checkpoint.save is not set")
    return StartPoint(reason=why)


def describe_start(start: StartPoint, train_iters: int) -> str:
    """What rank 0 says once at the start: which checkpoint, which step, how many samples, and why."""
    if start.folder is None:
        return f"megaswift: starting from random initialisation: {start.reason}"
    if start.weights_only:
        return f"megaswift: starting from the weights of {start.folder} at step 0: {start.reason}"
    return (f"megaswift: resuming from {start.folder} at step {start.step} of {train_iters}, "
            f"{start.consumed_samples()} samples consumed: {start.reason}")


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("overrides",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(recorded: dict, config) -> list[tuple[str, object, object]]:
    """(setting, recorded value, this run's value) for each setting a resume changes."""
    before, now = _flatten(recorded), _flatten(config_to_dict(config))
    return [(key, before[key], now[key]) for key in now
            if key in before and before[key] != now[key] and not key.startswith(NOT_COMPARED)]


def check_resume_changes(start: StartPoint, changes: list[tuple[str, object, object]]) -> None:
    refused = [(key, old, new) for key, old, new in changes if key in DATA_POSITION_SETTINGS]
    if refused:
        listed = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError(
            f"resuming {start.folder} (step {start.step}, {start.consumed_samples()} samples consumed) with {listed}: "
            f"the data position recorded in the checkpoint points into the data as it was, so this cannot change "
            f"in mid-run. Resume with the recorded value, or start a new run from these weights on the new data: "
            f"--checkpoint.load {start.folder} --checkpoint.finetune with another checkpoint.save")


def describe_changes(changes: list[tuple[str, object, object]], start: StartPoint) -> str | None:
    if not changes:
        return None
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
    return f"megaswift: settings changed since {start.folder}: {listed} (the data resumes at sample " \
           f"{start.consumed_samples()})"


def _architecture(hf: dict) -> dict:
    return {key: value for key, value in hf.items()
            if key not in NOT_ARCHITECTURE and key not in COMPATIBLE_MODEL_FIELDS}


def check_model_settings(given: dict, start: StartPoint) -> None:
    """`given`: the model settings the user gave (flags and YAML), not defaults or recorded ones. When a
    checkpoint defines the model, those that describe another model are an error naming both values."""
    if start.folder is None:
        return
    saved = start.meta["hf_config"]
    for key, value in (given.get("overrides") or {}).items():
        if key not in COMPATIBLE_MODEL_FIELDS and saved.get(key) != value:
            raise ConfigError(
                f"model.overrides sets {key}={value!r}, but the checkpoint {start.folder} holds a model "
                f"with {key}={saved.get(key)!r}: a checkpoint defines its model. Drop it from model.overrides (only "
                f"{', '.join(COMPATIBLE_MODEL_FIELDS)} may change), or start without that checkpoint for another model")
    for name in ("hf_config", "preset"):
        if not given.get(name):
            continue
        only_this = ModelConfig(preset=given[name]) if name == "preset" else ModelConfig(hf_config=given[name])
        described = _architecture(resolve_hf_config(only_this))
        held = _architecture(saved)
        differ = [key for key in described if key in held and described[key] != held[key]]
        if differ:
            shown = ", ".join(f"{key} {described[key]!r} vs {held[key]!r}" for key in differ[:6])
            raise ConfigError(
                f"model.{name}={given[name]} describes another model than the checkpoint {start.folder} holds: "
                f"{shown} (model.{name} vs checkpoint). A checkpoint defines its model: drop model.{name}, "
                f"or start without that checkpoint to train another model")


def model_of_checkpoint(start: StartPoint, overrides: dict) -> dict:
    """The checkpoint's HF config with the compatible overrides (dropout) of this run applied."""
    hf = dict(start.meta["hf_config"])
    hf.update({key: value for key, value in (overrides or {}).items() if key in COMPATIBLE_MODEL_FIELDS})
    return hf
