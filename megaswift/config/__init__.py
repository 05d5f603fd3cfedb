"""Typed settings; see flags.py for how they become YAML files and command-line flags."""
from megaswift.config.flags import ConfigError, config_from_args, config_from_dict, config_to_dict
from megaswift.config.sections import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, ParallelConfig,
                                       PretrainConfig, SFTConfig, SFTDataConfig, TrainConfig,
                                       TunerConfig)

__all__ = ["ConfigError", "config_from_args", "config_from_dict", "config_to_dict", "CheckpointConfig",
           "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig", "PretrainConfig",
           "SFTConfig", "SFTDataConfig", "TrainConfig", "TunerConfig"]
