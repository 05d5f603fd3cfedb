"""Flags and YAML files are views of the same dataclasses, with defaults < YAML < flags."""
import argparse

import pytest

from megaswift.config import ConfigError, PretrainConfig, config_from_args
from megaswift.config.flags import add_config_arguments


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    return config_from_args(PretrainConfig, parser.parse_args(argv))


def test_defaults_yaml_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  lr: 0.5\n  train_iters: 7\nparallel:\n  tensor: 2\n")
    config = _parse(["--config", str(yaml_file), "--train.lr", "0.25", "--data.paths", "a", "b"])
    assert config.train.lr == 0.25          # flag beats YAML
    assert config.train.train_iters == 7    # YAML beats default
    assert config.parallel.tensor == 2
    assert config.data.paths == ["a", "b"]
    assert config.train.micro_batch_size == PretrainConfig().train.micro_batch_size


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    flags = {a.dest for a in parser._actions}
    expected = {f"{section}.{name}" for section, value in vars(PretrainConfig()).items() for name in vars(value)}
    assert expected <= flags


def test_bool_and_json_flags():
    config = _parse(["--parallel.sequence_parallel", "--model.overrides", '{"num_hidden_layers": 2}',
                     "--logging.tensorboard", "false"])
    assert config.parallel.sequence_parallel is True
    assert config.model.overrides == {"num_hidden_layers": 2}
    assert config.logging.tensorboard is False


def test_unknown_yaml_key_names_file_and_allowed_keys(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.train: unknown key\(s\) \['learning_rate'\]; allowed: .*'lr'"):
        _parse(["--config", str(yaml_file)])


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="does not exist"):
        _parse(["--config", "/nonexistent/run.yaml"])
