"""Read regions of tensors from a megatron-core torch_dist checkpoint, whatever layout saved it.

torch.distributed.checkpoint stores each tensor as chunks (one per TP/PP/EP shard that saved it);
`read_region` asks for one region of a global tensor and DCP's resharding reads the overlapping
chunks, so memory stays at one region (plus one stored chunk) at a time.
"""
import json
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from converters.errors import ConversionError
from converters.mcore_writer import MCORE_BACKEND_FILE


class _RegionLoadPlanner(LoadPlanner):
    def __init__(self, items: list[ReadItem], target: torch.Tensor):
        self.items, self.target = items, target

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan(self.items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("no objects are read")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self.target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class McoreCheckpointReader:
    def __init__(self, folder: Path, metadata=None):
        """`metadata`: the folder's .metadata when the caller has read it already (a foreign checkpoint's
        check has), so it is read once."""
        self.folder = Path(folder)
        backend_file = self.folder / MCORE_BACKEND_FILE
        try:
            backend = json.loads(backend_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ConversionError(f"{backend_file}: not a megatron-core dist checkpoint ({e})") from None
        if backend.get("sharded_backend") != "torch_dist":
            raise ConversionError(f"{backend_file}: sharded_backend={backend.get('sharded_backend')!r} is not "
                                  "supported; expected 'torch_dist' (re-save the checkpoint in the torch_dist "
                                  "format)")
        self.storage = FileSystemReader(str(self.folder))
        try:
            self.metadata = metadata if metadata is not None else self.storage.read_metadata()
        except Exception as e:
            raise ConversionError(f"{self.folder / '.metadata'}: cannot read checkpoint metadata: {e}") from e
        self.storage.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConversionError(f"{self.folder}: checkpoint has no tensor {key!r} (made by an unsupported "
                                  "megatron-core layer spec or model?)")
        return md

    def read_region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        md = self.tensor_metadata(key)
        target = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, md, [chunk])
        covered = sum(item.lengths.numel() for item in items)
        if covered != target.numel():
            raise ConversionError(f"{self.folder}: tensor {key!r} region offsets={offsets} sizes={sizes} is only "
                                  f"partly stored ({covered} of {target.numel()} elements)")
        planner = _RegionLoadPlanner(items, target)
        plan = self.storage.prepare_local_plan(planner.create_local_plan())
        (plan,) = self.storage.prepare_global_plan([plan])
        self.storage.read_data(plan, planner).wait()
        return target
