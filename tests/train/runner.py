"""Run `megaswift pt` as users do (a subprocess, torchrun for several processes) and read its metrics."""
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.torchrun import child_env, run_torchrun

TINY_RUN = {
    "model.preset": "tiny-llama", "data.seq_length": 32, "data.split": "100,0,0",
    "train.micro_batch_size": 1, "train.global_batch_size": 4, "train.lr": 1e-3, "train.lr_warmup_iters": 1,
    "train.precision": "fp32", "logging.progress_bar": "false", "logging.tensorboard": "false",
}


def pt_flags(demo_data, out: Path, **settings) -> list[str]:
    tokenizer, prefix = demo_data
    values = {**TINY_RUN, "data.paths": str(prefix), "data.tokenizer": str(tokenizer),
              "logging.output_dir": str(out), **{k.replace("__", "."): v for k, v in settings.items()}}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


PT_COMMAND = ("-m", "megaswift", "pt")


def run_pt(flags: list[str], nproc: int = 1, timeout: float = 240, check: bool = True,
           command: tuple[str, ...] = PT_COMMAND):
    """`command` is what follows `python`: `-m megaswift pt`, or a script that takes the same flags."""
    if nproc > 1:
        return run_torchrun([*command, *flags], nproc=nproc, timeout=timeout)
    env = child_env(OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, *command, *flags], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"megaswift pt failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def wait_for(predicate, proc, timeout=180):
    """Poll until predicate() holds; fail early (with its stderr) if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting")


def steps_logged(out: Path) -> int:
    """Complete training-step records in OUT/metrics.jsonl so far (a run may be writing it)."""
    file = out / "metrics.jsonl"
    if not file.is_file():
        return 0
    return sum(1 for line in file.read_text().splitlines() if line.endswith("}") and '"loss"' in line)
