"""Flags and YAML files are views of the same dataclasses, with defaults < YAML < flags."""
import argparse
import subprocess
import sys

import pytest

from megaswift.config import ConfigError, PretrainConfig, SFTConfig, config_from_args
from megaswift.config.flags import add_config_arguments, closest_names
from tests.torchrun import child_env


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
    expected = {f"{section}.{name}" for section, value in vars(PretrainConfig()).items()
                if not isinstance(value, dict) for name in vars(value)}
    assert expected <= flags
    # the `megatron` pass-through: one (hidden) flag per megatron-core config field a value can be written for
    assert {"megatron.attention_softmax_in_fp32", "megatron.num_buckets", "megatron.recompute_modules"} <= flags
    assert "megatron.init_method" not in flags  # a callable


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


def _help(cls=PretrainConfig) -> str:
    parser = argparse.ArgumentParser(prog="megaswift pt")
    add_config_arguments(parser, cls)
    return " ".join(parser.format_help().split())  # argparse wraps lines at the terminal width


@pytest.mark.parametrize("cls, flag, shown", [
    (PretrainConfig, "--train.lr FLOAT", "peak learning rate (default: 0.0003)"),
    (PretrainConfig, "--train.micro_batch_size INT", "(default: 2)"),
    (PretrainConfig, "--model.preset TEXT", "(default: tiny-llama)"),
    (PretrainConfig, "--parallel.sequence_parallel [BOOL]", "(default: false)"),
    (PretrainConfig, "--checkpoint.save TEXT", "(default: not set)"),
    (PretrainConfig, "--data.paths TEXT [TEXT ...]", "(default: none)"),
    (SFTConfig, "--data.seq_length INT", "(default: 512)"),
])
def test_help_shows_each_default(cls, flag, shown):
    text = _help(cls)
    after = text[text.index(flag) + len(flag):]
    assert after.split(" --")[0].strip().endswith(shown), after[:300]


def test_help_says_a_default_once_where_the_help_text_explains_it():
    text = _help()
    entry = text[text.index("--checkpoint.load TEXT"):].split(" --")[0]
    assert entry.count("default") == 1 and "(default: save, if it has one)" in entry


def test_defaults_stay_out_of_parsed_flags():
    """Shown in --help, but never passed as flags: a default must not override the YAML file."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    assert vars(parser.parse_args([])) == {"config": None}


KNOWN = ["--train.train_iters", "--train.eval_iters", "--train.lr_warmup_iters", "--train.lr", "--train.min_lr",
         "--data.seq_length", "--parallel.tensor", "--parallel.pipeline", "--checkpoint.finetune",
         "--checkpoint.save"]


@pytest.mark.parametrize("typed, expected", [
    ("--train.iters", ["--train.train_iters"]),      # the example: not eval_iters or lr_warmup_iters
    ("--lr", ["--train.lr"]),
    ("--data.seq_len", ["--data.seq_length"]),
    ("--train.lr-warmup-iters", ["--train.lr_warmup_iters"]),
    ("--paralel.tensor", ["--parallel.tensor"]),
    ("--checkpoint.fintune", ["--checkpoint.finetune"]),
    ("--foo", []),
])
def test_closest_names(typed, expected):
    assert closest_names(typed, KNOWN) == expected


def test_unknown_yaml_key_suggests_the_close_one(tmp_path):
    yaml_file = tmp_path / "typo.yaml"
    yaml_file.write_text("train:\n  iters: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['iters'\]; iters: did you mean train_iters\?"):
        _parse(["--config", str(yaml_file)])


def test_pt_parses_without_importing_megatron_core():
    """Registering the hidden --megatron.* flags imports megatron-core (seconds): `megaswift pt` parses a
    command line without such a flag without them (a fresh process: this one may have imported megatron-core
    already). With one, they are there: test_perf_settings.py's --megatron.* cases."""
    code = ("import sys; from megaswift.cli.main import parse_command_line\n"
            "print(vars(parse_command_line(['pt', '--train.lr', '0.5'])), 'megatron.core' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["{'command': 'pt', 'config': None, 'train.lr': 0.5} False"]
