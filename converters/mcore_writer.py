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

Speed (benchmarks/convert_speed.py): each file's CRC32 for the integrity record is taken while its bytes
are written, instead of reading the checkpoint back and summing it: a tensor's bytes from the CRC32
torch.save computes anyway (in its zip data descriptor), the rest summed as written; and the tensors can
be read into one reused buffer (`ReusedMemory`), since fresh memory
costs a page fault per 4 KiB on first touch: here reading a file into fresh memory ran at 0.7-1.7 GiB/s,
into memory already touched at 11-12 GiB/s. The files themselves are written with direct I/O where the file
system allows it (direct_io.py: the page-cache copy was 55% of the CPU time at 13 GiB).
"""
import ctypes
import ctypes.util
import functools
import io
import json
import struct
import zlib
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from converters.direct_io import open_for_writing
from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout, McoreTensor

MCORE_BACKEND_FILE = "metadata.json"
MCORE_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


_SUM_CHUNK = 4 << 20  # written and summed in pieces that stay in the CPU cache between the two
_TORCH_RECORD = 1 << 20  # writes this large are the data of a torch.save record (its tensor's bytes)
_DESCRIPTOR = struct.Struct("<4sIII")  # zip data descriptor: signature, CRC32, sizes; follows a record's data
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"


@functools.cache
def _crc32_combine():
    """zlib's crc32_combine64 (CRC of A+B from those of A and B), which Python's zlib does not expose; None
    where the library is not found (every byte is then summed). Looked up at the first write, not at
    import: find_library runs `ldconfig -p` in a subprocess."""
    try:
        combine = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1").crc32_combine64
    except (OSError, AttributeError):
        return None
    combine.restype, combine.argtypes = ctypes.c_ulong, (ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64)
    return combine



class _SummingStream:
    """A file opened for writing that sums (size, CRC32) of what goes through it. torch's writer only
    writes, tells and flushes; a seek would make the sum wrong, so it marks the sum unusable (`sequential`).

    A tensor's bytes are not summed a second time: torch.save already computes the CRC32 of each record it
    writes and puts it in the zip data descriptor that follows the record's data, so the data's CRC is
    combined in from there (crc32_combine). Anything else than that descriptor after the data makes the sum
    unusable, and integrity.record_files then reads the file back."""

    def __init__(self, raw):
        self.raw, self.crc, self.size, self.sequential = raw, 0, 0, True
        self.pending = 0  # bytes of record data written but not yet in `crc`: waiting for their descriptor

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.pending:
            self._take_pending(view)
        if len(view) >= _TORCH_RECORD and _crc32_combine() is not None:
            self.raw.write(view)  # a BufferedWriter writes all of it (or raises)
            self.pending = len(view)
        else:
            for start in range(0, len(view), _SUM_CHUNK):
                chunk = view[start:start + _SUM_CHUNK]
                self.raw.write(chunk)
                self.crc = zlib.crc32(chunk, self.crc)
        self.size += len(view)
        return len(view)

    def _take_pending(self, view: memoryview) -> None:
        if len(view) == _DESCRIPTOR.size:
            signature, crc, compressed, size = _DESCRIPTOR.unpack(view)
            if signature == _DESCRIPTOR_SIGNATURE and compressed == size == self.pending:
                self.crc, self.pending = _crc32_combine()(self.crc, crc, self.pending), 0
                return
        self.sequential, self.pending = False, 0

    def seek(self, *args):
        self.sequential = False
        return self.raw.seek(*args)

    def __getattr__(self, name):  # tell, flush, fileno, close: the file's own
        return getattr(self.raw, name)


class _SummingFileSystem(FileSystem):
    """torch's local file system, writing each file with direct I/O where the file system allows it
    (`direct`; converters/direct_io.py) and recording {file name: {"size", "crc32"}} of each file it writes
    (integrity.record_files' format), in `sums`."""

    def __init__(self, sums: dict[str, dict], direct: bool = True):
        super().__init__()
        self.sums, self.direct = sums, direct

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with open_for_writing(path, self.direct) as raw:
            stream = _SummingStream(raw)
            yield stream
        if stream.sequential and not stream.pending:
            self.sums[Path(path).name] = {"size": stream.size, "crc32": f"{stream.crc:08x}"}


class ReusedMemory:
    """One buffer, the size of the largest tensor to write, that each produced tensor is read into in turn.
    Safe because torch's serial loader (per_thread_copy_ahead=0) writes each tensor before it asks for the
    next; so a tensor from `empty` is valid only until the next call. Each tensor has a storage of exactly
    its own bytes: torch.save writes a tensor's whole storage, and the loader clones a tensor whose storage
    is larger. The storage is not resizable, so `_release_last_written` leaves it alone."""

    def __init__(self, nbytes: int):
        self._buffer = bytearray(nbytes)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0 or nbytes > len(self._buffer):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(memoryview(self._buffer)[:nbytes], dtype=torch.uint8).view(dtype).view(shape)

    def release(self) -> None:
        """Gives the buffer back (once the tensors made from it are gone); `empty` then allocates."""
        self._buffer = bytearray()


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
                           group=None, direct_io: bool = True) -> dict[str, dict]:
    """`group`: the gloo group of the ranks writing this checkpoint together, each its `share` (None: this
    process alone writes everything). `direct_io`: write the files with O_DIRECT where the file system
    allows it (converters/direct_io.py). Returns {file name: {"size", "crc32"}} of the data files this rank
    wrote, summed while writing (for integrity.record_files)."""
    rank = 0 if group is None else torch.distributed.get_rank(group)
    folder.mkdir(parents=True, exist_ok=True)
    # per_thread_copy_ahead=0 keeps torch on its serial loader even where CUDA is available: its
    # overlapping loader resolves tensors ahead of writing them, which `_release_last_written` forbids
    # (and our tensors are on the CPU already, so there is nothing to overlap).
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=False,
                                  per_thread_copy_ahead=0)
    sums: dict[str, dict] = {}
    writer.fs = _SummingFileSystem(sums, direct_io)
    planner = LazySavePlanner(layout, dtypes, produce, share, with_objects=rank == 0)
    try:
        dcp.save({}, storage_writer=writer, planner=planner, process_group=group, no_dist=group is None)
    except CheckpointException as e:  # torch's wrapper of every rank's failure (a BaseException)
        raise _first_failure(e, rank, 1 if group is None else torch.distributed.get_world_size(group)) from e
    if rank == 0:
        (folder / MCORE_BACKEND_FILE).write_text(json.dumps(MCORE_BACKEND))
    return sums
