"""`megaswift pt`: pre-train on Megatron indexed datasets (run it under torchrun for more than one process)."""
import argparse
import sys

from megaswift.config import ConfigError, PretrainConfig
from megaswift.config.flags import add_config_arguments
from megaswift.cli.run_config import build_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from megaswift.checkpointing.layout import CheckpointError
    from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
    from megaswift.train.trainer import Trainer, TrainingError
    try:
        config = build_run_config(PretrainConfig, args)
        trainer = Trainer(config, data_source=None)
        t = config.train
        dp = trainer.dp_size
        valid_samples = t.eval_iters * t.micro_batch_size * dp if t.eval_interval else 0
        trainer.data_source = PretrainData(
            config.data, token_ids_from_tokenizer(config.data.tokenizer, trainer.hf["vocab_size"]), t.seed,
            t.micro_batch_size, t.train_iters * t.global_batch_size, valid_samples)
        result = trainer.run()
    except (ConfigError, CheckpointError, TrainingError) as e:
        print(f"megaswift pt: error: {e}", file=sys.stderr)
        return 2
    if result.stopped_by_signal:
        print(f"megaswift pt: stopped by signal after step {result.last_step}; checkpoint saved", file=sys.stderr)
    return 0
