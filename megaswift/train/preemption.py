"""SIGTERM (Slurm preemption, pre-timeout signal, `kill`) becomes a request to stop after the current step.

Ranks may receive the signal at different moments, so the decision is agreed collectively each step:
any rank that saw it makes every rank stop, save and exit at the same step.
"""
import signal

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signals = signals
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank once any rank has been signalled (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
