"""`megaswift pt`: pre-train on Megatron indexed datasets (run it under torchrun for more than one process)."""
import argparse

from megaswift.cli.report import end_of_run, report_error
from megaswift.cli.run_config import build_run_config
from megaswift.cli.startup import start_up_imports
from megaswift.config import PretrainConfig
from megaswift.config.flags import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def prepare(args: argparse.Namespace, world_size: int | None = None):
    """(config, trainer) after every check that needs no process group: the settings, the layout for
    `world_size` processes (default: this run's), the checkpoint to start from, the data files.
    `megaswift launch` runs it too, before starting any process."""
    from megaswift.data.data_paths import check_data_paths
    from megaswift.objectives.pretrain import PretrainObjective
    from megaswift.train.trainer import Trainer
    config = build_run_config(PretrainConfig, args)
    trainer = Trainer(config, PretrainObjective(), world_size=world_size)
    check_data_paths(config)
    return config, trainer


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.checkpointing.layout import CheckpointError
        from megaswift.config import ConfigError
        from megaswift.train.trainer import TrainingError
    errors = (ConfigError, CheckpointError, TrainingError)
    try:
        config, trainer = prepare(args)
        trainer.prepare_data()  # the indexed datasets' split sizes and token ids are checked here
    except errors as e:  # no process group yet: every rank found the same
        return report_error("pt", e, same_on_every_rank=True)
    try:
        result = trainer.run()
    except errors as e:
        return report_error("pt", e, same_on_every_rank=isinstance(e, TrainingError))
    end_of_run("pt", config, result)
    return 0
