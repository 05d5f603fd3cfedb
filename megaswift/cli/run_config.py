"""Builds a run's config from a checkpoint's recorded config, the YAML file and the flags (in that order)."""
import argparse
from pathlib import Path

from megaswift.config import config_from_args
from megaswift.config.flags import load_yaml


def given_model_settings(args: argparse.Namespace) -> dict:
    """The model settings the user wrote (YAML file, then flags), without defaults or recorded values."""
    given = dict((load_yaml(args.config).get("model") or {}) if getattr(args, "config", None) else {})
    given.update({key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith("model.")})
    return given


def _same_folder(a: str | None, b: str | None) -> bool:
    return (a is None) == (b is None) and (a is None or Path(a).resolve() == Path(b).resolve())


def build_run_config(cls, args: argparse.Namespace):
    """Resuming needs no flags repeated: when the run resumes a checkpoint (the resume rule of
    train/resume.py), its recorded config is the base that the YAML file and the flags override. Model
    settings that contradict the checkpoint's model are refused; logging.output_dir defaults inside the run's
    own folder."""
    from megaswift.checkpointing.adapter import is_adapter_checkpoint, recorded_tuner
    from megaswift.train.metrics import default_output_dir
    from megaswift.train.resume import check_model_settings, checkpoint_to_load
    config = config_from_args(cls, args)
    start = checkpoint_to_load(config)
    check_model_settings(given_model_settings(args), start)
    # the checkpoint's model (its HF config travels in megaswift.json), not a default preset; a checkpoint
    # megaswift did not write records none, so the config the user named stays (train/resume.py)
    if start.weights_only and not start.meta.get("foreign"):
        config.model.preset = config.model.hf_config = None
    if start.weights_only and is_adapter_checkpoint(start.meta):  # an adapter brings its settings (flags still win)
        config = config_from_args(cls, args, base={"tuner": recorded_tuner(start.meta)})
        config.model.preset = config.model.hf_config = None
    if start.resumed:
        recorded = dict(start.recorded_config())
        recorded.get("train", {}).pop("exit_after_iters", None)  # a one-off stop, not part of the run
        # How this run starts is this run's choice (it decided `start`), never the recorded run's.
        for key in ("load", "finetune"):
            (recorded.get("checkpoint") or {}).pop(key, None)
        if not _same_folder((recorded.get("checkpoint") or {}).get("save"), config.checkpoint.save):
            # Saving elsewhere is another run: its logs go beside its own checkpoints, not into the first run's.
            (recorded.get("logging") or {}).pop("output_dir", None)
        config = config_from_args(cls, args, base={k: v for k, v in recorded.items() if k in vars(config)})
    if not config.logging.output_dir:
        config.logging.output_dir = default_output_dir(config.checkpoint.save)
    return config
