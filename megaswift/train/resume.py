"""Where a run starts, and what may change when it resumes.

The rule (the same for pt, sft and every later trainer): a complete checkpoint in `checkpoint.save` always
wins and resumes the full state (weights, optimizer, schedule, consumed samples, RNG); `checkpoint.load`
(with `checkpoint.finetune`: weights only) seeds only a run whose `checkpoint.save` holds no checkpoint yet.
So rerunning the identical command (a Slurm requeue) continues the run instead of starting it over.
A checkpoint another trainer wrote (Megatron-LM's layout, checkpointing/foreign.py) can only seed a run: with
checkpoint.finetune, and model.hf_config naming the model it holds (checked against its tensors first).

A resumed run's config is the recorded one under the YAML file and the flags (cli/run_config.py). Settings
that decide which sample comes next cannot change in mid-run (the position would point into other data);
everything else may, and the run says what changed. A checkpoint also defines the model: model flags that
contradict it are refused, dropout fields may be changed.

LoRA/DoRA runs (tuner.type lora|dora, checkpointing/adapter.py) add three rules. A full checkpoint is the
frozen base: the run loads its weights only and the adapters start from their initialisation (with
--checkpoint.load OUT, the adapter that `hf2mcore --adapter` imported beside the base, OUT/adapter/, is
loaded instead; --checkpoint.load OUT/iter_0000000 takes the base alone). An adapter
checkpoint brings its base (the recorded one, fingerprint checked) and resumes in full when it holds
optimizer state. And the settings that define an adapter (rank, alpha, rslora, targets, modules_to_save,
type) cannot change under it.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megaswift.checkpointing.adapter import (adapter_beside, adapter_meta, base_record, is_adapter_checkpoint,
                                             recorded_tuner, resolve_base, settings_differences)
from megaswift.checkpointing.foreign import ForeignCheckpoint, is_foreign_checkpoint
from megaswift.checkpointing.layout import read_latest, read_meta, resolve_checkpoint
from megaswift.config import ConfigError, ModelConfig, config_to_dict
from megaswift.models import resolve_hf_config

# Settings a resumed run may not change: each decides which sample the recorded position points at.
DATA_POSITION_SETTINGS = ("data.paths", "data.split", "data.seq_length", "data.datasets", "data.packing",
                          "data.over_length", "data.valid_fraction", "train.seed")
# Not part of what a run trains: where it writes, how it reports, a one-off stop, caches and workers.
NOT_COMPARED = ("checkpoint.", "logging.", "eval.", "train.exit_after_iters", "data.cache_dir", "data.num_proc",
                "data.num_workers")  # eval.*: what is scored beside training, never the training itself
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
    base: Path | None = None  # LoRA/DoRA: the frozen base checkpoint the adapters sit on
    # a checkpoint another trainer wrote, as opened and checked here: its weights load without reading it again
    foreign: ForeignCheckpoint | None = field(default=None, compare=False, repr=False)

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
    return _with_adapter_rules(_resume_rule(config), getattr(getattr(config, "tuner", None), "type", "full"),
                               config.checkpoint.load)


def _resume_rule(config) -> StartPoint:
    ck = config.checkpoint
    if _has_checkpoint(ck.save):
        folder = resolve_checkpoint(ck.save)
        why = f"checkpoint.save {ck.save} holds a complete checkpoint, which always wins"
        if ck.load:
            why += f"; checkpoint.load {ck.load} only seeds a run whose checkpoint.save is still empty"
        return StartPoint(folder, False, True, why, read_meta(folder))
    if ck.load and is_foreign_checkpoint(ck.load):
        return _foreign_start(config)
    if ck.load:
        folder = resolve_checkpoint(ck.load)
        empty = f"checkpoint.save {ck.save} holds no checkpoint yet" if ck.save else "checkpoint.save is not set"
        how = "with checkpoint.finetune (weights only)" if ck.finetune else "without checkpoint.finetune (full state)"
        why = f"checkpoint.load {ck.load} {how}, and {empty}"
        return StartPoint(folder, ck.finetune, not ck.finetune, why, read_meta(folder))
    why = "no checkpoint.load, and " + (f"checkpoint.save {ck.save} holds no checkpoint yet" if ck.save
                                        else "checkpoint.save is not set")
    return StartPoint(reason=why)


def _foreign_start(config) -> StartPoint:
    """checkpoint.load names a checkpoint megaswift did not write (checkpointing/foreign.py): its weights, for
    the model the user names, checked tensor by tensor against that model before anything is built."""
    ck, model = config.checkpoint, config.model
    what = (f"checkpoint.load {ck.load} was not written by megaswift (no megaswift.json: the layout Megatron-LM, "
            f"Megatron-Bridge and ms-swift write)")
    if not ck.finetune:
        raise ConfigError(f"{what}; megaswift can start from its weights, not resume another trainer's optimizer, "
                          f"schedule and data position: add --checkpoint.finetune")
    if not model.hf_config:  # model.preset has a default, so it cannot say which model the checkpoint holds
        raise ConfigError(f"{what}, and it records no HF config: name the config of the model it holds with "
                          f"--model.hf_config DIR (a folder with config.json, or the file)")
    tuner = getattr(getattr(config, "tuner", None), "type", "full")
    if tuner != "full":
        raise ConfigError(f"{what}; tuner.type {tuner} trains adapters on a megaswift base checkpoint: convert it "
                          f"first (megaswift convert mcore2hf {ck.load} HF_DIR --hf-config CONFIG, then megaswift "
                          f"convert hf2mcore HF_DIR OUT) and load OUT")
    from converters.errors import ConversionError
    from converters.foreign_checkpoint import config_file_of, open_checked
    try:
        ckpt, hf, _ = open_checked(ck.load, resolve_hf_config(model), config_file_of(model.hf_config))
    except ConversionError as e:
        raise ConfigError(str(e)) from None
    empty = f"checkpoint.save {ck.save} holds no checkpoint yet" if ck.save else "checkpoint.save is not set"
    why = f"checkpoint.load {ck.load} with checkpoint.finetune (weights only; {ckpt.describe()}), and {empty}"
    return StartPoint(ckpt.folder, True, False, why, {"hf_config": hf, "iteration": ckpt.iteration, "foreign": True},
                      foreign=ckpt)


def _with_adapter_rules(start: StartPoint, tuner_type: str, load: str | None) -> StartPoint:
    """The LoRA rules of the module docstring applied to the start the resume rule chose. The adapter imported
    beside a converted base is used when checkpoint.load names the converted folder (OUT/); naming its
    OUT/iter_0000000 takes the base alone, for a new adapter."""
    if start.folder is None:
        return start
    if is_adapter_checkpoint(start.meta):
        # An imported adapter has no optimizer state: training starts on it at step 0.
        weights_only = start.weights_only or "optimizer" not in start.meta.get("contents", [])
        why = start.reason + ("; it is an adapter without optimizer state, so training starts on it at step 0"
                              if weights_only and not start.weights_only else "")
        return dataclasses.replace(start, weights_only=weights_only, resumed=not weights_only, reason=why,
                                   base=resolve_base(start.folder, start.meta))
    if tuner_type == "full":
        return start
    imported = adapter_beside(start.folder) if load and start.folder.parent == Path(load) else None
    if imported is not None:
        meta = read_meta(imported)
        return StartPoint(imported, True, False, f"{start.reason}; tuner.type {tuner_type}: {start.folder} is the "
                          f"frozen base and {imported} the adapter imported beside it (hf2mcore --adapter), trained "
                          f"on from step 0", meta, resolve_base(imported, meta))
    return StartPoint(start.folder, True, False, f"{start.reason}; tuner.type {tuner_type}: its weights are the "
                      f"frozen base (a full checkpoint holds no adapter), the adapters start from their "
                      f"initialisation", start.meta, start.folder)


def check_adapter_start(start: StartPoint, config) -> None:
    """A LoRA run needs a base to save against, an adapter checkpoint a LoRA run with its own settings."""
    tuner = config_to_dict(config.tuner)
    if is_adapter_checkpoint(start.meta):
        differ = settings_differences(recorded_tuner(start.meta), tuner)
        if differ:
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} in this run" for key, old, new in differ)
            flags = " ".join(f"--{key} {_flag_value(old)}" for key, old, _ in differ)
            raise ConfigError(
                f"{start.folder} holds an adapter made with other settings ({listed}): the adapter's tensors and "
                f"its function depend on them, so they cannot change under it. Continue it with {flags}, or train "
                f"a new adapter on its base ({start.base}) with --checkpoint.load {start.base}")
    elif tuner["type"] != "full" and start.base is None and config.checkpoint.save:
        raise ConfigError(
            f"tuner.type {tuner['type']} trains adapters on a frozen base, and its checkpoints hold only the "
            f"adapters and name the base checkpoint they sit on; this run starts from random weights, which no "
            f"checkpoint holds. Give the base with --checkpoint.load (e.g. a `megaswift convert hf2mcore` output)")


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def adapter_checkpoint_meta(start: StartPoint, config) -> dict:
    """What a LoRA run's save adds to megaswift.json (checkpointing/adapter.py); {} for a full run."""
    tuner = config_to_dict(config.tuner)
    if tuner["type"] == "full":
        return {}
    # The base as the loaded adapter recorded it, its path made absolute (an imported adapter's is relative
    # to its own folder, not to this run's checkpoints).
    base = {**start.meta["adapter"]["base"], "path": str(start.base.resolve())} \
        if is_adapter_checkpoint(start.meta) else base_record(start.base)
    return adapter_meta(tuner, base)


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
