"""torchrun's agent with SIGTERM meaning "save and stop", so a preempted job that saved cleanly exits 0.

torchrun's own SIGTERM handler raises inside the agent: it kills the workers after a timeout and exits 1 with a
traceback, so a job that checkpointed cleanly after Slurm's pre-timeout signal would end FAILED. Here the agent
passes SIGTERM on to its workers and keeps supervising them: they finish the step, save, exit 0, and so does
the agent. A worker that does not handle SIGTERM still dies of it and the launch fails, as it should.
torchrun keeps its own handling of SIGINT, SIGHUP and SIGQUIT (interactive stops).
"""
import signal
import sys

import psutil

SIGNALS_TORCHRUN_HANDLES = "SIGINT,SIGHUP,SIGQUIT"


def forward_to_workers(signum, frame) -> None:
    for worker in psutil.Process().children():
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:
            pass  # already gone: nothing to ask


def describe_failure(error) -> tuple[str, int]:
    """(one line, exit status) for torchrun's ChildFailedError, in place of its traceback and its 20-line
    report: the workers printed their own errors above it. The cause is the first worker that exited with an
    error status, else the first killed by a signal other than SIGTERM (torchrun stops the others with
    SIGTERM, and its timestamps have whole-second resolution, so they cannot tell cause and effect apart)."""
    failures = error.failures
    exited = [rank for rank, f in failures.items() if f.exitcode > 0]
    killed = [rank for rank, f in failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    cause = min(exited or killed or failures, key=lambda rank: (failures[rank].timestamp, rank))
    failure = failures[cause]
    if failure.exitcode > 0:
        line = f"megaswift launch: rank {cause} exited with status {failure.exitcode} (its own output above says " \
               f"why)"
    else:  # SIGKILL with no message of its own is most often the kernel's out-of-memory killer
        line = f"megaswift launch: rank {cause} was stopped by {failure.signal_name()}"
    others = sorted(rank for rank in failures if rank != cause)
    if others:
        line += f"; then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped too"
    return line, failure.exitcode if failure.exitcode > 0 else 1


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, forward_to_workers)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main([f"--signals-to-handle={SIGNALS_TORCHRUN_HANDLES}", *argv])
    except ChildFailedError as error:
        line, status = describe_failure(error)
        print(line, file=sys.stderr, flush=True)
        sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
