"""Benchmarks on the checkpoints a run saves, while it goes on training (the `eval` config section).

Each evaluation is `megaswift eval` on a saved iter_* folder, started by rank 0 as a background process: it
reads only files on disk, so training's weights, RNG and data order cannot change, and it runs in its own
process group at low priority (on the CPU by default), so it neither stalls the steps for long nor takes
accelerator memory. One evaluation runs at a time; later ones queue. Scores are appended to metrics.jsonl
(and TensorBoard and the log line) as {"step": N, "eval/<task>/<metric>": value} when they complete. A
failed evaluation is reported and never stops the run; at its end the run waits (eval.wait_s at most) for
what is still running, and stops it, process group and all, when the time is up, on SIGTERM or on an error.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from megaswift.config import ConfigError
from megaswift.serve.harness import CUSTOM_SUFFIXES, YAML_SUFFIXES, is_custom_task, require_lm_eval

RESULTS_DIR = "checkpoint_eval"  # under logging.output_dir: each evaluation's JSON and log
NICENESS = "10"
# A torchrun worker's rendezvous settings; the evaluation is a process of its own and must not reuse them.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def check_eval_settings(config) -> None:
    """The `eval` section against the checkpoint settings, before any process starts."""
    ev, ck = config.eval, config.checkpoint
    if not ev.tasks:
        if ev.interval:
            raise ConfigError(f"eval.interval is {ev.interval} but eval.tasks is empty: name the tasks to run "
                              f"(--eval.tasks my_mcq.csv my_qa.jsonl ...) or leave eval.interval at 0")
        return
    if not ck.save:
        raise ConfigError("eval.tasks evaluates saved checkpoints, but checkpoint.save is not set: give "
                          "--checkpoint.save DIR")
    if ev.interval < 0:
        raise ConfigError(f"eval.interval: expected 0 or a positive number of steps, found {ev.interval}")
    if ev.interval and (not ck.save_interval or ev.interval % ck.save_interval):
        raise ConfigError(f"eval.interval is {ev.interval} but checkpoint.save_interval is {ck.save_interval}: "
                          f"each evaluation reads the checkpoint saved at its step, so eval.interval must be a "
                          f"multiple of checkpoint.save_interval (e.g. --checkpoint.save_interval "
                          f"{ev.interval})")
    for name, value, least in (("max_new_tokens", ev.max_new_tokens, 1), ("batch_size", ev.batch_size, 1),
                               ("limit", ev.limit, 1), ("wait_s", ev.wait_s, 0)):
        if value is not None and value < least:
            raise ConfigError(f"eval.{name}: expected at least {least}, found {value}")


def task_entries(tasks: list[str]) -> list[str]:
    """eval.tasks as `megaswift eval --tasks` items: comma-separated values split, files made absolute."""
    entries = [item for value in tasks for item in value.split(",") if item]
    return [str(Path(item).resolve()) if Path(item).suffix in CUSTOM_SUFFIXES + YAML_SUFFIXES else item
            for item in entries]


def unusable_task(entry: str) -> str | None:
    """Why a task file cannot be evaluated (read the way `megaswift eval` reads it), or None. Checked once
    when the run starts, so a broken file costs one message instead of a failed evaluation per checkpoint."""
    from megaswift.data.sft.formats import SampleFormatError
    from megaswift.serve.eval_tasks import read_task

    if not is_custom_task(entry):
        if Path(entry).suffix in YAML_SUFFIXES and not Path(entry).is_file():
            return f"{entry}: no such file (expected an lm-eval task YAML)"
        try:
            require_lm_eval([entry])
        except ValueError as err:
            return str(err)
        return None
    try:
        read_task(entry)
    except (SampleFormatError, ValueError, FileNotFoundError, OSError) as err:
        return str(err)
    return None


def eval_scores(results: dict) -> dict[str, float]:
    """`megaswift eval`'s JSON as metrics.jsonl keys: every numeric score of each task (its item count left
    out) as eval/<task>/<metric>."""
    return {f"eval/{task}/{metric}": value for task, metrics in results["tasks"].items()
            for metric, value in metrics.items()
            if metric not in ("kind", "n") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def snapshot_checkpoint(ckpt: Path, dest: Path) -> Path:
    """A copy of a checkpoint that checkpoint.keep_last cannot delete before its evaluation reads it: hard
    links (no data copied) where the two folders share a file system, a real copy otherwise."""
    if dest.exists():
        shutil.rmtree(dest)
    try:
        shutil.copytree(ckpt, dest, copy_function=os.link)
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(ckpt, dest)
    return dest


@dataclass
class _Evaluation:
    step: int
    checkpoint: Path
    snapshot: bool  # checkpoint is our own copy, removed when done
    process: subprocess.Popen | None = None
    started: float = 0.0


class CheckpointEvaluator:
    """Rank 0's evaluations of saved checkpoints; on other ranks (enabled False) every method does nothing."""

    def __init__(self, config, enabled: bool, log):
        """`log`: writes one metrics record (MetricsLogger.log)."""
        ev = config.eval
        self.enabled = enabled and bool(ev.tasks)
        self.settings, self.log = ev, log
        self.interval, self.keep_last = ev.interval, config.checkpoint.keep_last
        self.folder = Path(config.logging.output_dir) / RESULTS_DIR
        self.queue: list[_Evaluation] = []
        self.running: _Evaluation | None = None
        self.stopping = False
        self.tasks = task_entries(ev.tasks) if self.enabled else []
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            for entry in list(self.tasks):
                problem = unusable_task(entry)
                if problem:
                    self._report(f"eval.tasks: {problem}; this task is left out of the evaluations of this run "
                                 f"(training goes on; once it is fixed, `megaswift eval --model <checkpoint>` "
                                 f"scores the saved checkpoints)")
                    self.tasks.remove(entry)
            self.enabled = bool(self.tasks)

    # -- the training loop's hooks -------------------------------------------------------------------------

    def checkpoint_saved(self, step: int, checkpoint: Path, last: bool, stopping: bool) -> None:
        """After a save: queue its evaluation when its step is due (eval.interval, or the run's last step).
        A run stopping on a signal starts nothing new: its grace period is for the save."""
        if stopping:
            self.stopping = True
        if not self.enabled or stopping or not (last or (self.interval and step % self.interval == 0)):
            return
        snapshot = self.keep_last > 0  # retention may delete the folder before its evaluation reads it
        if snapshot:
            checkpoint = snapshot_checkpoint(checkpoint, self.folder / f"snapshot-{checkpoint.name}")
        self.queue.append(_Evaluation(step, checkpoint, snapshot))
        self.poll()

    def poll(self) -> None:
        """Collects a finished evaluation (its scores logged) and starts the next queued one."""
        if not self.enabled:
            return
        if self.running is not None and self.running.process.poll() is not None:
            self._collect(self.running)
            self.running = None
        if self.running is None and self.queue and not self.stopping:
            self.running = self._start(self.queue.pop(0))

    def close(self, wait: bool = True) -> None:
        """The run's end: waits up to eval.wait_s for the queued and running evaluations (not when `wait` is
        False or the run is stopping on a signal), then stops what is left."""
        if not self.enabled:
            return
        try:
            if wait and not self.stopping and (self.running or self.queue):
                self._wait(time.monotonic() + self.settings.wait_s)
        finally:  # also when the wait is interrupted (Ctrl-C): nothing of ours outlives the run
            self._stop_all()

    def _wait(self, deadline: float) -> None:
        print(f"megaswift: waiting up to {self.settings.wait_s:g}s for checkpoint evaluations (eval.wait_s)",
              flush=True)
        # Training's SIGTERM handler (preemption.py) is gone by now: a SIGTERM ends the wait, not the process.
        main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if main_thread else None
        try:
            while (self.running or self.queue) and not self.stopping and time.monotonic() < deadline:
                self.poll()
                time.sleep(0.2)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        self.stopping = True
        self.poll()  # one that has just finished is collected, not stopped
        left = [e.step for e in ([self.running] if self.running else []) + self.queue]
        if self.running is not None:
            _stop_group(self.running.process)
            self._cleanup(self.running)
            self.running = None
        for evaluation in self.queue:
            self._cleanup(evaluation)
        self.queue = []
        if left:
            self._report(f"the evaluations of step(s) {', '.join(map(str, left))} did not finish before the run "
                         f"ended and were stopped; run `megaswift eval --model <checkpoint> --tasks ...` on those "
                         f"checkpoints to score them")

    # -- one evaluation ------------------------------------------------------------------------------------

    def _paths(self, step: int) -> tuple[Path, Path, Path]:
        stem = self.folder / f"iter_{step:07d}"
        return stem.with_suffix(".json"), stem.with_suffix(".log"), self.folder / f"export-iter_{step:07d}"

    def command(self, evaluation: _Evaluation) -> list[str]:
        ev = self.settings
        results, _, export = self._paths(evaluation.step)
        command = [sys.executable, "-m", "megaswift", "eval", "--model", str(evaluation.checkpoint),
                   "--tasks", ",".join(self.tasks), "--output", str(results), "--export-cache", str(export),
                   "--device", ev.device, "--max-new-tokens", str(ev.max_new_tokens),
                   "--batch-size", str(ev.batch_size)]
        if ev.limit is not None:
            command += ["--limit", str(ev.limit)]
        if ev.lm_eval_include:
            command += ["--lm-eval-include", *ev.lm_eval_include]
        if ev.num_fewshot is not None:
            command += ["--num-fewshot", str(ev.num_fewshot)]
        if ev.apply_chat_template:
            command.append("--apply-chat-template")
        nice = shutil.which("nice")
        return [nice, "-n", NICENESS, *command] if nice else command

    def _environment(self) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
        if self.settings.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the on-the-fly export too stays off the accelerators
        return env

    def _start(self, evaluation: _Evaluation) -> _Evaluation:
        results, log_file, _ = self._paths(evaluation.step)
        results.unlink(missing_ok=True)
        with open(log_file, "w") as log:
            # start_new_session: its own process group, so stopping it stops whatever it started too, and a
            # Ctrl-C or SIGTERM meant for training reaches training alone (which then stops the evaluation).
            evaluation.process = subprocess.Popen(self.command(evaluation), stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, env=self._environment(),
                                                  start_new_session=True)
        evaluation.started = time.monotonic()
        return evaluation

    def _collect(self, evaluation: _Evaluation) -> None:
        results, log_file, _ = self._paths(evaluation.step)
        seconds = time.monotonic() - evaluation.started
        code = evaluation.process.returncode
        try:
            if code == 0:
                self.log({"step": evaluation.step, **eval_scores(json.loads(results.read_text()))})
                print(f"megaswift: evaluated the checkpoint of step {evaluation.step} in {seconds:.0f}s "
                      f"(results in {results})", flush=True)
            else:
                self._report(f"the evaluation of step {evaluation.step} failed (exit status {code}): "
                             f"{_error_lines(log_file)}; full log in {log_file}; training goes on")
        except (OSError, ValueError, KeyError) as err:
            self._report(f"the evaluation of step {evaluation.step} wrote no readable results ({err}); log in "
                         f"{log_file}; training goes on")
        finally:
            self._cleanup(evaluation)

    def _cleanup(self, evaluation: _Evaluation) -> None:
        """The exported HF folder and any snapshot: as large as the model, and no longer needed."""
        shutil.rmtree(self._paths(evaluation.step)[2], ignore_errors=True)
        if evaluation.snapshot:
            shutil.rmtree(evaluation.checkpoint, ignore_errors=True)

    @staticmethod
    def _report(message: str) -> None:
        print(f"megaswift: checkpoint evaluation: {message}", file=sys.stderr, flush=True)


def _error_lines(log_file: Path, tail: int = 5) -> str:
    """The evaluation's own error message (`megaswift eval: error: ...`), else the last lines of its log."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "error" in line.lower()]
    return " / ".join((errors or lines)[-tail:]) or "no output"


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the evaluation's process group, SIGKILL when it is still there after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
