"""The sbatch scripts: valid bash, the #SBATCH defaults that make preemption safe, and nothing but a launch."""
import re
import subprocess

import pytest

from tests.slurm.cluster import REPO

SCRIPTS = {name: REPO / "slurm" / f"{name}.sh" for name in ("pretrain", "sft", "convert")}


def sbatch_options(text: str) -> dict:
    return dict(re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups() for line in text.splitlines()
                if line.startswith("#SBATCH"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash_and_launches_through_the_launcher(name):
    assert subprocess.run(["bash", "-n", SCRIPTS[name]], capture_output=True, timeout=30).returncode == 0
    text = SCRIPTS[name].read_text()
    assert "srun --ntasks-per-node=1" in text and "python -m megaswift launch" in text
    assert sum(line.startswith("srun ") for line in text.splitlines()) == 1, "one step per job: a second srun would start a second rendezvous"
    assert sbatch_options(text)["ntasks-per-node"] == "1"


@pytest.mark.parametrize("name, command", [("pretrain", "megaswift pt"), ("sft", "megaswift sft")])
def test_training_scripts_are_requeue_and_signal_safe(name, command):
    text = SCRIPTS[name].read_text()
    options = sbatch_options(text)
    assert "requeue" in options and options["open-mode"] == "append"
    assert re.fullmatch(r"B:TERM@\d+", options["signal"]), "the batch shell must get the pre-timeout signal"
    assert {"nodes", "gpus-per-node", "time", "exclusive"} <= set(options)
    assert f"-- {command} --config \"$config\"" in text
    assert "& \nstep=$!" in text.replace('" &\n', "& \n") and "trap " in text and 'wait "$step"' in text


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*/*.yaml")), ids=lambda p: p.parent.name)
def test_example_configs_are_valid_run_configs(example):
    """What `sbatch slurm/{pretrain,sft}.sh EXAMPLE.yaml` hands to the trainer: every key a known setting."""
    import yaml

    from megaswift.config import PretrainConfig, SFTConfig, config_from_dict
    cls = SFTConfig if example.parent.name == "sft" else PretrainConfig
    config = config_from_dict(cls, yaml.safe_load(example.read_text()), str(example))
    assert config.train.train_iters > 0
