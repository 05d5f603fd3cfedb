"""Write a megatron-core torch_dist checkpoint one tensor at a time.

`dist_checkpointing.save` wants the whole state dict in memory. Instead we hand
torch.distributed.checkpoint a plan of write items built from the meta-model layout (keys, global
shapes, offsets, dtypes known up front) and a planner whose `resolve_data` computes each tensor only
when the writer reaches it (torch's serial loader asks for them one by one), so peak memory is a few
tensors. The files are what megatron-core's torch_dist strategy writes: `__0_0.distcp`, `.metadata`
and `metadata.json`.

Several ranks write one checkpoint together: each plans only its share of the tensors (rank 0 also the
small objects), torch's coordinator merges the plans into the one `.metadata`, and each rank writes its
`__<rank>_0.distcp`, as megatron-core's ranks do.
"""
import io
import json
from collections.abc import Collection
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout, McoreTensor

MCORE_BACKEND_FILE = "metadata.json"
MCORE_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


def _tensor_write_item(target: McoreTensor, dtype: torch.dtype) -> WriteItem:
    offset = torch.Size(target.offset)
    return WriteItem(
        index=MetadataIndex(fqn=target.key, offset=offset), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offset, sizes=torch.Size(target.chunk_sizes)),
                                    properties=TensorProperties(dtype=dtype), size=torch.Size(target.global_shape)))


class LazySavePlanner(DefaultSavePlanner):
    """Plans the given items and produces each tensor on demand via `produce(name)`."""

    def __init__(self, layout: McoreLayout, dtypes: dict[str, torch.dtype],
                 produce: Callable[[McoreTensor], torch.Tensor], share: Collection[str] | None = None,
                 with_objects: bool = True):
        """`share`: names of the tensors to write (None: all); `with_objects`: also the layout's objects."""
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        mine = layout.tensors if share is None else {name: layout.tensors[name] for name in share}
        self.targets = {(t.key, tuple(t.offset)): t for t in mine.values()}
        self.items = [WriteItem(index=MetadataIndex(fqn=o.key), type=WriteItemType.BYTE_IO)
                      for o in (layout.objects if with_objects else [])]
        self.items += [_tensor_write_item(t, dtypes[t.name]) for t in mine.values()]
        self.objects = {o.key: o.data for o in layout.objects}
        self.produce = produce
        self.last_written: torch.Tensor | None = None

    def _release_last_written(self) -> None:
        """FileSystemWriter keeps a reference to every tensor it wrote (a dict it only uses for its
        safetensors format) until the file is done, so the embedding would stay resident for the whole
        run. Its serial loader asks for the next tensor only after writing the previous one, so the
        previous tensor's memory can be given back here."""
        if self.last_written is not None and self.last_written.untyped_storage().resizable():
            self.last_written.untyped_storage().resize_(0)
        self.last_written = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self.objects[write_item.index.fqn]], buffer)  # as megatron-core stores ShardedObjects
            return buffer
        self._release_last_written()
        target = self.targets[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = self.produce(target)
        expected = write_item.tensor_data
        if tuple(tensor.shape) != target.shape or tensor.dtype != expected.properties.dtype:
            raise AssertionError(f"{target.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{target.shape} {expected.properties.dtype}")
        self.last_written = tensor.contiguous().view(target.chunk_sizes)
        return self.last_written


def _first_failure(error: CheckpointException, rank: int, world: int) -> BaseException:
    """This rank's own error as raised (a ConversionError naming a bad file stays one), else the first failed
    rank's, named as such."""
    if rank in error.failures:
        return error.failures[rank][0]
    failed, (cause, _) = min(error.failures.items())
    return ConversionError(f"rank {failed} of {world} failed while writing its share of the checkpoint: "
                           f"{type(cause).__name__}: {cause}")


def write_mcore_checkpoint(folder: Path, layout: McoreLayout, dtypes: dict[str, torch.dtype],
                           produce: Callable[[McoreTensor], torch.Tensor], share: Collection[str] | None = None,
                           group=None) -> None:
    """`group`: the gloo group of the ranks writing this checkpoint together, each its `share` (None: this
    process alone writes everything)."""
    rank = 0 if group is None else torch.distributed.get_rank(group)
    folder.mkdir(parents=True, exist_ok=True)
    # per_thread_copy_ahead=0 keeps torch on its serial loader even where CUDA is available: its
    # overlapping loader resolves tensors ahead of writing them, which `_release_last_written` forbids
    # (and our tensors are on the CPU already, so there is nothing to overlap).
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=False,
                                  per_thread_copy_ahead=0)
    planner = LazySavePlanner(layout, dtypes, produce, share, with_objects=rank == 0)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, process_group=group, no_dist=group is None)
    except CheckpointException as e:  # torch's wrapper of every rank's failure (a BaseException)
        raise _first_failure(e, rank, 1 if group is None else torch.distributed.get_world_size(group)) from e
    if rank == 0:
        (folder / MCORE_BACKEND_FILE).write_text(json.dumps(MCORE_BACKEND))
