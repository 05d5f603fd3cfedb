"""The ranks of a multi-process conversion (`megaswift launch --nproc-per-node N -- megaswift convert ...`).

Every rank runs the same checks and computes the same plan; the ranks talk only to
- agree after each step that every rank got through it: a rank's error reaches all of them, so none is left
  waiting on a peer that has given up (`step`);
- write one torch_dist checkpoint together (torch.distributed.checkpoint over a gloo group);
- add up what each rank read, for the coverage check over the union (`gather`).
The finishing steps (metadata, verification, the rename into place) run on rank 0 alone: verification loads
the checkpoint with megatron-core at TP=1, in a one-process group of its own, so the world group is closed
first (`close_group`) and the other ranks wait for rank 0's outcome on the rendezvous store (`on_rank0`).
One process (WORLD_SIZE unset or 1) does no communication at all: every step just runs.
"""
import contextlib
import datetime
import json
import os
from pathlib import Path

import torch.distributed as dist

from converters.errors import ConversionError

TIMEOUT_ENV = "MEGASWIFT_CONVERT_TIMEOUT_S"
# Long enough for the slowest rank's share of a TB-sized checkpoint, or rank 0's verification, to finish
# while the others wait; a rank that dies makes torchrun stop the others at once, so this bounds only a hang.
DEFAULT_TIMEOUT_S = 4 * 3600
FINISHED_KEY = "rank0_finished"
ACK_KEY = "ack_{rank}"
ACK_WAIT = datetime.timedelta(seconds=60)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if not isinstance(error, ConversionError) else str(error)


class ConversionRanks:
    """This process's place among the conversion's ranks (rank 0 of 1 when alone) and how they talk."""

    def __init__(self, rank: int = 0, world: int = 1, store=None, timeout: datetime.timedelta | None = None):
        self.rank, self.world, self.store, self.timeout = rank, world, store, timeout
        self.group = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    # --- collectives while the world group is open --------------------------------------------------
    @contextlib.contextmanager
    def step(self, what: str):
        """Runs the body on every rank, then all ranks exchange their outcome: each raises its own error, or
        a ConversionError naming the first failed rank and its error."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except Exception as e:
            with contextlib.suppress(Exception):  # a peer that died already: our own error is the news
                self._exchange(what, _describe(e))
            raise
        self._exchange(what, None)

    def _exchange(self, what: str, error: str | None) -> None:
        outcomes = [None] * self.world
        dist.all_gather_object(outcomes, error, group=self.group)
        failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise ConversionError(f"rank {rank} of {self.world} failed while {what}: {message}")

    def gather(self, value) -> list:
        """`value` from every rank, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def shared_folder(self, folder: Path | None, out_dir: Path) -> Path:
        """Rank 0's temporary output `folder`, on every rank; every node must see it (a shared filesystem)."""
        folder = self.broadcast(folder)
        if not folder.is_dir():
            raise ConversionError(f"rank {self.rank}: {folder}, the temporary output folder rank 0 created for "
                                  f"{out_dir}, is not visible here; a conversion on several nodes needs OUT_DIR on "
                                  f"a filesystem every node shares")
        return folder

    def close_group(self) -> None:
        """Ends the world group (on every rank, after the last collective); the store stays for `on_rank0`."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    # --- after the group: rank 0 finishes, the others wait for its word --------------------------------
    @contextlib.contextmanager
    def on_rank0(self, what: str):
        """Yields True on rank 0, whose body does the work, and False elsewhere; afterwards every rank has rank
        0's outcome (its own error on rank 0, a ConversionError naming it on the others)."""
        if self.world == 1:
            yield True
            return
        if not self.is_first:
            yield False
            self._await_rank0(what)
            return
        try:
            yield True
        except Exception as e:
            self._announce(_describe(e))
            raise
        self._announce(None)

    def _announce(self, error: str | None) -> None:
        self.store.set(FINISHED_KEY, json.dumps({"error": error}))
        # Without torchrun, rank 0's process hosts the store: stay until the others have read the outcome.
        with contextlib.suppress(Exception):
            self.store.wait([ACK_KEY.format(rank=r) for r in range(1, self.world)], ACK_WAIT)

    def _await_rank0(self, what: str) -> None:
        try:
            self.store.wait([FINISHED_KEY], self.timeout)
        except Exception as e:
            raise ConversionError(f"rank {self.rank}: rank 0 did not finish {what} within "
                                  f"{self.timeout.total_seconds():.0f} s (set {TIMEOUT_ENV} to wait longer): "
                                  f"{e}") from None
        error = json.loads(self.store.get(FINISHED_KEY))["error"]
        self.store.set(ACK_KEY.format(rank=self.rank), "1")
        if error is not None:
            raise ConversionError(f"rank 0 of {self.world} failed while {what}: {error}")


@contextlib.contextmanager
def conversion_ranks():
    """The ranks torchrun (`megaswift launch`) started, with their gloo group open; one rank without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield ConversionRanks()
        return
    if dist.is_initialized():
        raise ConversionError(f"a multi-process conversion ({world} ranks) sets up its own process group, but one "
                              f"is already initialized: call hf2mcore from a fresh process per rank (`megaswift "
                              f"launch --nproc-per-node N -- megaswift convert ...`)")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    rank = int(os.environ["RANK"])
    # The rendezvous store is kept apart from the group (which gets a prefixed view of it), so it outlives
    # the group: rank 0 reports the outcome of the steps it finishes alone through it.
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    # Keys of their own for each conversion a process runs (every rank runs the same ones): a second
    # conversion in the same torchrun job must not find the first one's group or outcome on the store.
    conversion = store.add(f"megaswift_convert/conversions_of_rank_{rank}", 1)
    store = dist.PrefixStore(f"megaswift_convert/{conversion}/", store)
    dist.init_process_group("gloo", store=dist.PrefixStore("group", store), rank=rank, world_size=world,
                            timeout=timeout)
    ranks = ConversionRanks(rank, world, store, timeout)
    ranks.group = dist.group.WORLD
    try:
        yield ranks
    finally:
        ranks.close_group()
