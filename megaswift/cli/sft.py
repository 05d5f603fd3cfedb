"""`megaswift sft`: fine-tune on chat / agent data (run it under torchrun for more than one process)."""
import argparse

from megaswift.cli.report import end_of_run, report_error
from megaswift.cli.run_config import build_run_config
from megaswift.cli.startup import start_up_imports
from megaswift.config import ConfigError, SFTConfig
from megaswift.config.flags import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SFTConfig)


def _tokenizer_dir(config, load_dir) -> str:
    """data.tokenizer, else the tokenizer travelling in the checkpoint's hf_assets/; the error says which
    case it is (no checkpoint at all, or one without a tokenizer) and what to give."""
    from megaswift.checkpointing.layout import HF_ASSETS
    if config.data.tokenizer:
        return config.data.tokenizer
    if load_dir is None:
        raise ConfigError("data.tokenizer is not set and there is no checkpoint to take the tokenizer from: give "
                          "--data.tokenizer DIR (an HF tokenizer folder with a chat template), or start from a "
                          "converted model with --checkpoint.load DIR --checkpoint.finetune (its hf_assets/ hold "
                          "the model's tokenizer)")
    if not (load_dir / HF_ASSETS / "tokenizer_config.json").is_file():
        raise ConfigError(f"data.tokenizer is not set and the checkpoint {load_dir} has no tokenizer (no "
                          f"{HF_ASSETS}/tokenizer_config.json): give --data.tokenizer DIR, an HF tokenizer folder "
                          f"with a chat template (e.g. the HF model folder the checkpoint was converted from)")
    return str(load_dir / HF_ASSETS)


def prepare(args: argparse.Namespace, world_size: int | None = None):
    """(config, trainer) after every check that needs no process group: the settings, the layout for
    `world_size` processes (default: this run's), the checkpoint to start from, the data files and the
    tokenizer folder. `megaswift launch` runs it too, before starting any process."""
    from megaswift.data.data_paths import check_data_paths
    from megaswift.objectives.sft import SFTObjective
    from megaswift.train.trainer import Trainer
    config = build_run_config(SFTConfig, args)
    trainer = Trainer(config, SFTObjective(), world_size=world_size)
    check_data_paths(config)
    config.data.tokenizer = _tokenizer_dir(config, trainer.load_dir)  # recorded in the checkpoint's hf_assets
    return config, trainer


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.checkpointing.layout import CheckpointError
        from megaswift.data.sft.formats import SampleFormatError
        from megaswift.train.trainer import TrainingError
    errors = (ConfigError, CheckpointError, TrainingError, SampleFormatError, ValueError)
    try:
        config, trainer = prepare(args)
        trainer.prepare_data()  # loads the tokenizer and checks the dataset paths (preprocessing comes later)
    except errors as e:  # no process group yet: every rank found the same
        return report_error("sft", e, same_on_every_rank=True)
    try:
        result = trainer.run()
    except errors as e:
        return report_error("sft", e, same_on_every_rank=isinstance(e, TrainingError))
    end_of_run("sft", config, result)
    return 0
