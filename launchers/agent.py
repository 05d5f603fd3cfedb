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


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, forward_to_workers)
    from torch.distributed.run import main as torchrun_main

    torchrun_main([f"--signals-to-handle={SIGNALS_TORCHRUN_HANDLES}", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
