"""`megaswift rlhf`: preference training (DPO and its loss types, SimPO, ORPO) from an SFT checkpoint.

The same Trainer as pt and sft (checkpoints, resume, SIGTERM, logging); only the objective differs
(megaswift/objectives/dpo.py). The data settings are sft's, read as preference pairs
(megaswift/data/rlhf/); data.seq_length bounds a whole pair (chosen + rejected).
"""
import argparse

from megaswift.cli.report import end_of_run, report_error
from megaswift.cli.run_config import build_run_config
from megaswift.cli.sft import _tokenizer_dir
from megaswift.cli.startup import start_up_imports
from megaswift.config import ConfigError
from megaswift.config.flags import add_config_arguments
from megaswift.config.sections import RLHFRunConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RLHFRunConfig)


def prepare(args: argparse.Namespace, world_size: int | None = None):
    """(config, trainer) after every check that needs no process group (as `megaswift sft`'s), plus the
    rlhf settings: an unknown type, loss or reference source stops here, listing the valid ones."""
    from megaswift.data.data_paths import check_data_paths
    from megaswift.objectives.dpo import PreferenceObjective
    from megaswift.train.trainer import Trainer
    config = build_run_config(RLHFRunConfig, args)
    objective = PreferenceObjective(config.rlhf)
    if config.parallel.context > 1:
        raise ConfigError(f"rlhf: parallel.context {config.parallel.context} is not supported yet (a pair's "
                          f"log-probs would be split over context-parallel ranks); use parallel.context 1")
    if config.rlhf.reference == "adapters" and objective.loss.needs_reference and config.tuner.type == "full":
        raise ConfigError("rlhf.reference=adapters: the run trains every weight (tuner.type=full), so there are no "
                          "adapters to disable; use --rlhf.reference model or precomputed, or --tuner.type lora")
    trainer = Trainer(config, objective, world_size=world_size)
    check_data_paths(config)
    config.data.tokenizer = _tokenizer_dir(config, trainer.load_dir)
    return config, trainer


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.checkpointing.layout import CheckpointError
        from megaswift.data.sft.formats import SampleFormatError
        from megaswift.train.trainer import TrainingError
    errors = (ConfigError, CheckpointError, TrainingError, SampleFormatError, ValueError)
    try:
        config, trainer = prepare(args)
        # Every rank encodes the pairs here, before any process group: a bad row stops the run once, naming
        # its file and line, not once per rank in the middle of starting up.
        trainer.prepare_data().split_rows()
    except errors as e:
        return report_error("rlhf", e, same_on_every_rank=True)
    try:
        result = trainer.run()
    except errors as e:
        return report_error("rlhf", e, same_on_every_rank=isinstance(e, TrainingError))
    end_of_run("rlhf", config, result)
    return 0
