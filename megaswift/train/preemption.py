"""SIGTERM (Slurm preemption, pre-timeout signal, `kill`) becomes a request to stop after the current step.

Agreement: ranks may receive the signal at different moments, or only one of them may (a `kill` of one
worker). Each rank's request travels in the all-reduce that already sums the step's loss (see
`trainer.reduce_step_totals`), so every rank learns at the same step that some rank was asked to stop,
and no collective is added per step.

Surviving the signal: a stop signal is often sent to a whole process group or job step, not to the rank
alone. torchrun's agent closes its workers with `os.killpg(worker, SIGTERM)` (each worker leads its own
group) and Slurm signals every process of the step. Every process a rank has started then gets SIGTERM
too. megatron-core's torch_dist save sends each rank's write results through a multiprocessing Manager
queue whose server process it starts, as a child of the rank, at the first save; killed by that SIGTERM,
it makes the very save the stop asked for fail with `BrokenPipeError` (measured under plain torchrun:
the rank saw the signal, finished its step and died saving it). `StopRequest(saving=True)` starts that
Manager first, with SIGTERM ignored in it, so it outlives the signal; SIGKILL still ends it, and it shuts
down with the rank as megatron-core's own would.
"""
import multiprocessing
import signal
from multiprocessing.managers import SyncManager


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start_checkpoint_writer_queue() -> None:
    """Gives megatron-core's torch_dist writer its results queue now, served by a Manager process that ignores
    SIGTERM (see the module docstring). A no-op when the queue exists or megatron-core keeps it elsewhere."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started (an earlier run in this process), or a megatron-core that works otherwise
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # the context megatron-core uses
    manager.start(initializer=_ignore_sigterm)
    # The queue's proxy holds the manager, which shuts its process down when the rank exits.
    filesystem_async._results_queue = manager.Queue()


class StopRequest:
    """While entered, the stop signals set `requested` instead of ending the process."""

    def __init__(self, signals=(signal.SIGTERM,), saving: bool = False):
        self.requested = False
        self.signals = signals
        self.saving = saving
        self._previous = {}

    def __enter__(self):
        if self.saving:
            start_checkpoint_writer_queue()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
