"""A fine-tune stopped (exit_after_iters, SIGTERM) and rerun with the IDENTICAL command continues where it
stopped: the losses of every step equal an uninterrupted run's bit for bit in fp32 (dropout on), each step is
in metrics.jsonl once, and the checkpoint given by checkpoint.load only seeds the first run (issue 10 §2)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from megaswift.checkpointing.layout import META_FILE, read_latest, resolve_checkpoint
from tests.torchrun import child_env, run_torchrun
from tests.train.test_sft import _write_alpaca

TOTAL = 8
# Dropout on (HF config fields the model mapping honours), so the RNG state has to travel with the checkpoint.
DROPOUT = json.dumps({"attention_dropout": 0.2, "hidden_dropout": 0.2})


@pytest.fixture(scope="module")
def sft_base(demo_data, tmp_path_factory):
    """(data file, tokenizer, preprocessing cache, BASE): BASE is an initial checkpoint, as a converted one
    would be (weights and hf_assets, no optimizer state)."""
    root = tmp_path_factory.mktemp("resume_sft")
    data = _write_alpaca(root / "train.jsonl", count=16)
    base = root / "base"
    settings = (data, str(demo_data[0]), root / "cache")
    _run(_flags(settings, train_iters=0) + ["--checkpoint.save", str(base), "--checkpoint.save_initial", "true",
                                            "--logging.output_dir", str(root / "base_logs")])
    return settings, base / "iter_0000000"


def _flags(settings, train_iters=TOTAL, **extra) -> list[str]:
    data, tokenizer, cache = settings
    values = {"data.datasets": data, "data.tokenizer": tokenizer, "data.cache_dir": cache, "data.seq_length": 64,
              "train.micro_batch_size": 1, "train.global_batch_size": 4, "train.train_iters": train_iters,
              "train.lr": 1e-3, "train.lr_warmup_iters": 2, "train.precision": "fp32",
              "logging.progress_bar": "false", "logging.tensorboard": "false",
              **{key.replace("__", "."): value for key, value in extra.items()}}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def _seeded(settings, base, save, **extra) -> list[str]:
    """The command a user writes once and a scheduler repeats: start from BASE, save into `save`."""
    return _flags(settings, checkpoint__load=base, checkpoint__finetune="true", checkpoint__save=save,
                  model__overrides=DROPOUT, **extra)


def _run(flags, nproc=1, check=True) -> subprocess.CompletedProcess:
    if nproc > 1:
        return run_torchrun(["-m", "megaswift", "sft", *flags], nproc=nproc, timeout=300, check=check)
    env = child_env(OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "megaswift", "sft", *flags], capture_output=True, text=True,
                          timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"megaswift sft failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _records(save) -> list[dict]:
    """metrics.jsonl of a run, where logging.output_dir defaults to: <checkpoint.save>/logs."""
    return [json.loads(line) for line in (save / "logs" / "metrics.jsonl").read_text().splitlines()]


def _losses_once(save) -> dict[int, float]:
    steps = [r for r in _records(save) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)), "each step once, in order"
    return {r["step"]: r["loss"] for r in steps}


def _start(flags) -> subprocess.Popen:
    env = child_env(OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "megaswift", "sft", *flags], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_after_step(proc: subprocess.Popen, metrics, step: int) -> tuple[str, str]:
    """SIGTERM once metrics.jsonl shows `step` (the run then finishes that step, saves and exits 0)."""
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} logged ({proc.returncode}): {proc.communicate()[1][-4000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-4000:]
    return out, err


@pytest.fixture(scope="module")
def straight(sft_base, tmp_path_factory):
    settings, base = sft_base
    save = tmp_path_factory.mktemp("straight") / "ckpt"
    _run(_seeded(settings, base, save))
    return _losses_once(save)


@pytest.fixture(scope="module")
def dp2_straight(sft_base, tmp_path_factory):
    """DP=2 with the distributed optimizer, uninterrupted; its step-3 checkpoint serves the change test."""
    settings, base = sft_base
    save = tmp_path_factory.mktemp("dp2_straight") / "ckpt"
    _run(_seeded(settings, base, save, checkpoint__save_interval=3, **DP2), nproc=2)
    return _losses_once(save), save / "iter_0000003"


DP2 = {"parallel__distributed_optimizer": "true"}


def test_stopped_by_exit_after_iters_and_sigterm_then_identical_command_is_bit_identical(sft_base, straight,
                                                                                         tmp_path):
    """The same command again and again (what a Slurm requeue does) until the run is complete."""
    settings, base = sft_base
    save = tmp_path / "ckpt"
    command = _seeded(settings, base, save, train__exit_after_iters=3)
    first = _run(command)
    assert read_latest(save) == 3
    assert f"starting from the weights of {base} at step 0" in first.stdout
    out, err = _signal_after_step(_start(command), save / "logs" / "metrics.jsonl", 4)
    stopped = read_latest(save)  # the signal lands in step 5 or 6 (where exit_after_iters would stop anyway)
    assert f"stopped by signal after step {stopped}" in err and 4 <= stopped <= 6
    assert f"resuming from {save / 'iter_0000003'} at step 3 of {TOTAL}, 12 samples consumed" in out
    assert f"checkpoint.load {base} only seeds a run whose checkpoint.save is still empty" in out
    while read_latest(save) < TOTAL:
        _run(command)
    assert _losses_once(save) == straight  # fp32 on CPU, dropout on: exactly equal
    assert json.loads((resolve_checkpoint(save) / META_FILE).read_text())["consumed_samples"] == 4 * TOTAL
    assert (save / "logs" / "config.yaml").is_file()

    done = _run(command)  # a finished run, rerun: says so, trains nothing
    assert f"nothing to train: {save / f'iter_{TOTAL:07d}'} is at step {TOTAL}" in done.stdout
    assert _losses_once(save) == straight


def test_dp2_distributed_optimizer_stopped_then_identical_command_is_bit_identical(sft_base, dp2_straight, tmp_path):
    settings, base = sft_base
    save = tmp_path / "ckpt"
    command = _seeded(settings, base, save, train__exit_after_iters=TOTAL // 2, **DP2)
    _run(command, nproc=2)
    assert read_latest(save) == TOTAL // 2
    _run(command, nproc=2)
    assert read_latest(save) == TOTAL
    assert _losses_once(save) == dp2_straight[0]


def test_changed_lr_and_global_batch_on_resume(sft_base, dp2_straight, tmp_path):
    """A resume may change the schedule (megatron-core matched param groups by max_lr/min_lr, which failed the
    load) and the global batch (the data goes on from the recorded consumed samples, not step x batch); here
    with the distributed optimizer's state of a DP=2 run, resumed in one process."""
    step3 = dp2_straight[1]
    save = tmp_path / "ckpt"
    resumed = _run(["--checkpoint.load", str(step3), "--checkpoint.save", str(save), "--train.lr", "5e-4",
                    "--train.min_lr", "1e-5", "--train.lr_decay_style", "constant", "--train.global_batch_size", "8"])
    for change in ("train.lr 0.001 -> 0.0005", "train.min_lr 3e-05 -> 1e-05", "train.global_batch_size 4 -> 8",
                   "data resumes at sample 12"):
        assert change in resumed.stdout, (change, resumed.stdout[-3000:])
    steps = {r["step"]: r for r in _records(save) if "loss" in r}
    assert sorted(steps) == list(range(4, TOTAL + 1))
    assert [steps[s]["lr"] for s in steps] == [5e-4] * (TOTAL - 3)
    # The data position is the recorded one (12 samples), not step x new batch (24).
    meta = json.loads((resolve_checkpoint(save) / META_FILE).read_text())
    assert meta["consumed_samples"] == 3 * 4 + (TOTAL - 3) * 8
    # Per-rank RNG state does not fit another world size: said, and every generator reseeded.
    assert "RNG state was saved per rank at another layout (world_size 2 -> 1)" in resumed.stderr


def test_model_flags_that_contradict_the_checkpoint_are_refused(sft_base, tmp_path):
    settings, base = sft_base
    save = tmp_path / "ckpt"
    layers = _run(_flags(settings, checkpoint__load=base, checkpoint__finetune="true", checkpoint__save=save,
                         model__overrides=json.dumps({"num_hidden_layers": 3, "attention_dropout": 0.1})),
                  check=False)
    assert layers.returncode == 2, layers.stderr[-3000:]
    assert "model.overrides sets num_hidden_layers=3" in layers.stderr and "num_hidden_layers=4" in layers.stderr
    preset = _run(_flags(settings, checkpoint__load=base, checkpoint__finetune="true", checkpoint__save=save,
                         model__preset="tiny-qwen2"), check=False)
    assert preset.returncode == 2, preset.stderr[-3000:]
    assert "model.preset=tiny-qwen2 describes another model" in preset.stderr
    assert "'Qwen2ForCausalLM'" in preset.stderr and "'LlamaForCausalLM'" in preset.stderr
    assert not save.exists()


def test_resume_refuses_settings_that_move_the_data_position(sft_base, tmp_path):
    """The recorded position (samples consumed) means nothing in other data: refused, naming the setting."""
    settings, base = sft_base
    refused = _run(["--checkpoint.load", str(base), "--checkpoint.save", str(tmp_path / "ckpt"),
                    "--data.seq_length", "128"], check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "data.seq_length 64 -> 128" in refused.stderr and "--checkpoint.finetune" in refused.stderr


def test_dropout_is_on_in_these_runs(sft_base, straight, tmp_path):
    """What makes the bit-identical checks above about RNG state: the same first step without the dropout
    overrides gives another loss."""
    settings, base = sft_base
    save = tmp_path / "ckpt"
    _run(_flags(settings, train_iters=1, checkpoint__load=base, checkpoint__finetune="true", checkpoint__save=save))
    assert _losses_once(save)[1] != straight[1]
