"""The few collectives checkpoint storage needs, safe in a plain process (no process group: a world of one).

A decision about shared storage (is the folder locked, is there room, which temporary name) is made once,
on rank 0, and every rank acts on the same answer: ranks that decided apart could take different paths
into a collective and hang.
"""
from typing import Callable

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def on_rank0_agreed(action: Callable[[], object], error_type: type[Exception]):
    """Runs `action` on rank 0 only; an `error_type` it raises is raised on every rank (same message), so no
    rank is left waiting in a collective for one that failed. Returns the action's result on every rank."""
    outcome = (None, None)
    if rank() == 0:
        try:
            outcome = (action(), None)
        except error_type as e:
            outcome = (None, str(e))
            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise
            error = e
    result, message = broadcast_from_rank0(outcome)
    if message is not None:
        if rank() == 0:
            raise error
        raise error_type(message)
    return result


def say(message: str) -> None:
    """A line for the user, from rank 0 only."""
    if rank() == 0:
        print(f"megaswift: {message}", flush=True)
