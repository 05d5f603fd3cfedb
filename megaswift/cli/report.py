"""What `megaswift pt` / `sft` say about a run as a whole: an error once per run, and how the run ended.

Under torchrun every rank runs the command. Errors found before any process group exists come from the
same config and the same files on every rank, so rank 0 alone reports them; errors during training may be
one rank's own and are reported by the rank that meets them (unless agreed across ranks, as a stopping
training error is). Each message is one write ending in a newline, so lines of different ranks never glue.
"""
import os
import sys
import time

SILENT_RANK_GRACE_S = 5.0  # rank 0 meets the same error at about the same moment; this bounds the wait


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str, stream=None) -> None:
    """One line from rank 0 only."""
    if is_rank_zero():
        stream = stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


def report_error(command: str, error: Exception, same_on_every_rank: bool) -> int:
    """Prints `megaswift COMMAND: error: ...` (on rank 0 only when every rank meets the same error); returns
    the exit status for a bad setting or input."""
    if is_rank_zero() or not same_on_every_rank:
        sys.stderr.write(f"megaswift {command}: error: {error}\n")
        sys.stderr.flush()
    else:
        # torchrun stops every rank as soon as one ends: a silent rank ending first could stop rank 0 before
        # its line is out (seen in CI under load), so it leaves rank 0 the time to say it.
        time.sleep(SILENT_RANK_GRACE_S)
    return 2


def end_of_run(command: str, config, result) -> None:
    """Rank 0's last line: how far the run got, where its checkpoint and metrics are, how to continue."""
    save, total = config.checkpoint.save, config.train.train_iters
    step = result.last_step
    if result.stopped_by_signal:
        saved = f"checkpoint saved to {save}/iter_{step:07d}" if save else \
            "no checkpoint saved (checkpoint.save is not set)"
        say(f"megaswift {command}: stopped by signal after step {step}; {saved}", sys.stderr)
        return
    if not result.losses:
        return  # nothing was trained (a finished run rerun): the trainer said why
    latest = f"; latest checkpoint {save}/iter_{step:07d}" if save else "; no checkpoint (checkpoint.save is not set)"
    metrics = f"; metrics in {config.logging.output_dir}/metrics.jsonl" if config.logging.output_dir else ""
    if step < total:
        resume = " (the same command continues from it)" if save else ""
        say(f"megaswift {command}: stopped after step {step} of {total} (train.exit_after_iters="
            f"{config.train.exit_after_iters}){latest}{resume}{metrics}")
    else:
        say(f"megaswift {command}: done: step {step} of {total}{latest}{metrics}")
