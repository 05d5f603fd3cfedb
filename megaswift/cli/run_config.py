"""Builds a run's config from a checkpoint's recorded config, the YAML file and the flags (in that order)."""
import argparse

from megaswift.config import config_from_args


def build_run_config(cls, args: argparse.Namespace):
    """Resuming needs no flags repeated: when the run will resume from a checkpoint, its recorded config is
    the base that the YAML file and the flags override."""
    from megaswift.checkpointing.layout import read_meta
    from megaswift.train.trainer import checkpoint_to_load
    config = config_from_args(cls, args)
    load_dir, weights_only = checkpoint_to_load(config)
    if load_dir is None or weights_only:
        return config
    recorded = read_meta(load_dir).get("config") or {}
    recorded.get("train", {}).pop("exit_after_iters", None)  # a one-off stop, not part of the run
    return config_from_args(cls, args, base={k: v for k, v in recorded.items() if k in vars(config)})
