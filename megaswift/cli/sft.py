"""`megaswift sft`: fine-tune on chat / agent data (run it under torchrun for more than one process)."""
import argparse
import sys

from megaswift.cli.run_config import build_run_config
from megaswift.config import ConfigError, SFTConfig
from megaswift.config.flags import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SFTConfig)


def _tokenizer_dir(config, load_dir) -> str:
    from megaswift.checkpointing.layout import HF_ASSETS
    if config.data.tokenizer:
        return config.data.tokenizer
    if load_dir is not None and (load_dir / HF_ASSETS / "tokenizer_config.json").is_file():
        return str(load_dir / HF_ASSETS)
    raise ConfigError("data.tokenizer is not set and the checkpoint to load has no tokenizer in hf_assets/")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from megaswift.checkpointing.layout import CheckpointError
    from megaswift.data.sft.formats import SampleFormatError
    from megaswift.data.sft.training_source import SFTData
    from megaswift.train.trainer import Trainer, TrainingError
    try:
        config = build_run_config(SFTConfig, args)
        if not config.data.datasets:
            raise ConfigError("data.datasets is empty: give one or more chat datasets (jsonl, json, csv, parquet)")
        trainer = Trainer(config, data_source=None)
        tokenizer_dir = _tokenizer_dir(config, trainer.load_dir)
        config.data.tokenizer = tokenizer_dir  # recorded in the checkpoint and copied into its hf_assets
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        trainer.data_source = SFTData(config.data, tokenizer, config.train.seed, config.train.micro_batch_size,
                                      trainer.packed_attention or "mask")
        result = trainer.run()
    except (ConfigError, CheckpointError, TrainingError, SampleFormatError, ValueError) as e:
        print(f"megaswift sft: error: {e}", file=sys.stderr)
        return 2
    if result.stopped_by_signal:
        print(f"megaswift sft: stopped by signal after step {result.last_step}; checkpoint saved", file=sys.stderr)
    return 0
