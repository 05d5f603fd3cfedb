"""Bad input to `megaswift pt` exits non-zero with a message naming the setting, before any training; what
a run says is said once (rank 0), one line each, and known library notices are not repeated per rank."""
import importlib.metadata
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megaswift.cli import quiet, report
from megaswift.config import ConfigError
from tests.torchrun import child_env, run_torchrun
from tests.train.runner import pt_flags, run_pt


def _pt(*flags):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "megaswift", "pt", *flags], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("flags, message", [
    (["--model.preset", "gpt-5"], "unknown model preset 'gpt-5'; available: ["),
    (["--data.paths", "/nonexistent/data"], "/nonexistent/data.bin does not exist"),
    # TP=3 on one process also says how to start three
    (["--data.paths", "x", "--parallel.tensor", "3"], "world size 1 is not divisible by parallel.tensor x "
                                                      "parallel.pipeline x parallel.context = 3 x 1 x 1 = 3: this run "
                                                      "has 1 process and needs 3, 6, 9, ...; start 3 with `torchrun "
                                                      "--nproc-per-node 3 -m megaswift pt ...` or `megaswift launch "
                                                      "--nproc-per-node 3 -- megaswift pt ...`"),
    (["--checkpoint.load", "/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt does not exist"),
])
def test_bad_input_is_a_clear_error(flags, message, tmp_path):
    proc = _pt(*flags, "--logging.output_dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_section():
    env = child_env()
    out = subprocess.run([sys.executable, "-m", "megaswift", "pt", "--help"], capture_output=True, text=True,
                         timeout=60, env=env).stdout
    for flag in ("--parallel.tensor", "--train.lr", "--checkpoint.save", "--data.paths", "--config"):
        assert flag in out


def test_mistyped_flag_is_reported_by_the_subcommand_with_the_closest_flag():
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "megaswift", "pt", "--train.iters", "5"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "megaswift pt: error: unknown flag --train.iters (did you mean --train.train_iters?)", lines
    assert lines[1:] == ["(`megaswift pt --help` lists every flag and its default)"]
    assert "COMMAND" not in proc.stderr  # not the top-level usage, which says nothing about pt's flags


@pytest.mark.parametrize("load_dir, hf_assets, expected", [
    (None, None, "data.tokenizer is not set and there is no checkpoint to take the tokenizer from: give "
                 "--data.tokenizer DIR"),
    ("ckpt", False, "data.tokenizer is not set and the checkpoint {load_dir} has no tokenizer"),
])
def test_sft_says_why_it_has_no_tokenizer(load_dir, hf_assets, expected, tmp_path):
    from megaswift.cli.sft import _tokenizer_dir
    folder = None
    if load_dir:
        folder = tmp_path / load_dir
        (folder / "hf_assets").mkdir(parents=True)
    config = SimpleNamespace(data=SimpleNamespace(tokenizer=None))
    with pytest.raises(ConfigError) as raised:
        _tokenizer_dir(config, folder)
    assert expected.format(load_dir=folder) in str(raised.value)


def test_sft_takes_the_checkpoint_tokenizer(tmp_path):
    from megaswift.cli.sft import _tokenizer_dir
    (tmp_path / "hf_assets").mkdir()
    (tmp_path / "hf_assets" / "tokenizer_config.json").write_text("{}")
    config = SimpleNamespace(data=SimpleNamespace(tokenizer=None))
    assert _tokenizer_dir(config, tmp_path) == str(tmp_path / "hf_assets")


def _config(save="/ck", train_iters=5, exit_after_iters=None, output_dir="/ck/logs"):
    return SimpleNamespace(checkpoint=SimpleNamespace(save=save), logging=SimpleNamespace(output_dir=output_dir),
                           train=SimpleNamespace(train_iters=train_iters, exit_after_iters=exit_after_iters))


@pytest.mark.parametrize("rank, result, config, stdout, stderr", [
    ("0", SimpleNamespace(last_step=5, losses={5: 1.0}, stopped_by_signal=False), _config(),
     "megaswift pt: done: step 5 of 5; latest checkpoint /ck/iter_0000005; metrics in /ck/logs/metrics.jsonl\n", ""),
    ("0", SimpleNamespace(last_step=3, losses={3: 1.0}, stopped_by_signal=True), _config(),
     "", "megaswift pt: stopped by signal after step 3; checkpoint saved to /ck/iter_0000003\n"),
    ("0", SimpleNamespace(last_step=3, losses={3: 1.0}, stopped_by_signal=True), _config(save=None),
     "", "megaswift pt: stopped by signal after step 3; no checkpoint saved (checkpoint.save is not set)\n"),
    ("0", SimpleNamespace(last_step=2, losses={2: 1.0}, stopped_by_signal=False), _config(exit_after_iters=2),
     "megaswift pt: stopped after step 2 of 5 (train.exit_after_iters=2); latest checkpoint /ck/iter_0000002 "
     "(the same command continues from it); metrics in /ck/logs/metrics.jsonl\n", ""),
    ("1", SimpleNamespace(last_step=5, losses={5: 1.0}, stopped_by_signal=True), _config(), "", ""),
])
def test_end_of_run_is_one_line_from_rank_0(rank, result, config, stdout, stderr, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    report.end_of_run("pt", config, result)
    assert capsys.readouterr() == (stdout, stderr)


@pytest.mark.parametrize("rank, same_on_every_rank, shown", [("0", True, True), ("1", True, False),
                                                             ("1", False, True)])
def test_an_error_every_rank_meets_is_reported_by_rank_0_only(rank, same_on_every_rank, shown, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("RANK", rank)
    assert report.report_error("pt", ConfigError("bad"), same_on_every_rank) == 2
    assert capsys.readouterr().err == ("megaswift pt: error: bad\n" if shown else "")


def test_known_notices_are_said_once_by_rank_0_or_dropped(monkeypatch):
    monkeypatch.setattr(quiet, "_on_gpu", lambda: True)
    said = io.StringIO()
    rank0, rank1 = quiet.KnownNotices(rank0=True, stream=said), quiet.KnownNotices(rank0=False, stream=said)
    te = ["Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
          "Transformer Engine and Apex are not installed. Falling back to local implementations of "
          "multi_tensor_applier and multi_tensor_scale"]
    for notices in (rank0, rank1):
        assert [notices.shows(m) for m in te] == [False, False]
        assert notices.shows("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes") is False
        assert notices.shows("a warning nobody here knows") is True  # everything else shows as usual
    assert said.getvalue() == f"megaswift: note: {quiet.TE_APEX}\n"
    monkeypatch.setattr(quiet, "_on_gpu", lambda: False)
    on_cpu = quiet.KnownNotices(rank0=True, stream=said)
    assert on_cpu.shows(te[0]) is False and said.getvalue() == f"megaswift: note: {quiet.TE_APEX}\n"


def test_a_run_says_each_save_and_its_end_once_without_known_notices(demo_data, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_pt([*pt_flags(demo_data, tmp_path / "logs", train__train_iters=2, checkpoint__save=str(save),
                             checkpoint__save_interval=1)])
    lines = proc.stdout.splitlines()
    for step in (1, 2):
        assert lines.count(f"megaswift: checkpoint saved to {save / f'iter_{step:07d}'} (step {step})") == 1
    assert lines[-1] == (f"megaswift pt: done: step 2 of 2; latest checkpoint {save / 'iter_0000002'}; "
                         f"metrics in {tmp_path / 'logs'}/metrics.jsonl")
    for notice in quiet.KNOWN:
        assert notice.text not in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    meta = json.loads((save / "iter_0000002" / "megaswift.json").read_text())
    # the installed distribution, not megatron.core.__version__ (+ the git commit of the checkout around .venv)
    assert meta["megatron_core"] == importlib.metadata.version("megatron-core")


def test_a_layout_error_under_plain_torchrun_is_reported_once(demo_data, tmp_path):
    proc = run_torchrun(["-m", "megaswift", "pt", *pt_flags(demo_data, tmp_path / "logs"), "--parallel.tensor", "4"],
                        nproc=2, timeout=180, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("megaswift pt: error: world size 2 is not divisible by parallel.tensor") == 1, \
        proc.stderr[-4000:]
