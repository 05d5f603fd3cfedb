"""Write HF sharded safetensors with bounded memory: plan the shards from (name, shape, dtype) first,
write each file's header, then stream each tensor's bytes as it is produced, in plan order.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length, a JSON header
(`{name: {dtype, shape, data_offsets}}` + `__metadata__`), padded with spaces to 8 bytes, then data.
"""
import json
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converters.direct_io import open_for_writing

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class PlannedShard:
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1000' -> 1000 (HF's convention)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[PlannedShard]:
    """Fill shards in order; a tensor larger than the limit gets a shard of its own."""
    shards = [PlannedShard()]
    for t in tensors:
        if shards[-1].tensors and shards[-1].nbytes + t.nbytes > max_shard_bytes:
            shards.append(PlannedShard())
        shards[-1].tensors.append(t)
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(shard: PlannedShard) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard.tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedSafetensorsWriter:
    """`write(name, tensor)` in plan order; `close()` writes the index. Checks each tensor against the plan.
    Several ranks share the work of one folder: each writes the shards in its `mine` (indices into `shards`),
    and one writes the index (`write_index`). `direct_io`: the files are written with O_DIRECT where the file
    system allows it (direct_io.py)."""

    def __init__(self, folder: Path, shards: list[PlannedShard], mine: Collection[int] | None = None,
                 write_index: bool = True, direct_io: bool = True):
        self.folder, self.shards, self.write_index, self.direct_io = folder, shards, write_index, direct_io
        self.names = shard_file_names(len(shards))
        mine = set(range(len(shards))) if mine is None else set(mine)
        self.order = [(i, t) for i, s in enumerate(shards) if i in mine for t in s.tensors]
        self.wanted = {t.name for _, t in self.order}
        self.position, self.file, self.file_index = 0, None, -1

    def wants(self, name: str) -> bool:
        """Whether `name` is in this writer's shards."""
        return name in self.wanted

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, planned = self.order[self.position]
        if (name, tuple(tensor.shape), tensor.dtype) != (planned.name, planned.shape, planned.dtype):
            raise AssertionError(f"writing {name} {tuple(tensor.shape)} {tensor.dtype}, planned {planned}")
        if shard_index != self.file_index:
            self._open(shard_index)
        self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.position += 1

    def _open(self, shard_index: int) -> None:
        if self.file:
            self.file.close()
        self.file_index = shard_index
        self.file = open_for_writing(self.folder / self.names[shard_index], self.direct_io)
        self.file.write(_header(self.shards[shard_index]))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.position != len(self.order):
            raise AssertionError(f"only {self.position} of {len(self.order)} planned tensors were written")
        if not self.write_index:
            return
        weight_map = {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s.tensors}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards)}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
