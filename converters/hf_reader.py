"""Read an HF checkpoint folder tensor by tensor: safetensors (single or sharded with an index) or
pytorch_model.bin (`torch.load(weights_only=True, mmap=True)`). Shapes come from the headers, so
every check runs before any data is read; `read` records what was consumed for the coverage check.
"""
import json
from collections import Counter
from pathlib import Path

import torch

from converters.errors import ConversionError
from converters.safetensors_file import SafetensorsFile

# Buffers some older checkpoints carry that are recomputed by every model, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HfCheckpointReader:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self.reads: Counter[str] = Counter()
        self.file_of: dict[str, Path] = self._locate_tensors()

    # --- discovery ---------------------------------------------------------------------------------
    def _locate_tensors(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{index}: not a valid index file ({e!r}); expected a 'weight_map'")
                return self._checked_index(index, weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.folder / single).is_file():
                return {key: self.folder / single for key in self._keys_in(self.folder / single)}
        raise ConversionError(f"{self.folder}: no weights found; expected model.safetensors, "
                              "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")

    def _checked_index(self, index: Path, weight_map: dict[str, str]) -> dict[str, Path]:
        files = {name: self.folder / name for name in set(weight_map.values())}
        keys_in = {name: set(self._keys_in(path)) for name, path in files.items()}
        for key, name in weight_map.items():
            if key not in keys_in[name]:
                raise ConversionError(f"{index}: maps tensor {key!r} to {files[name]}, which does not hold it")
        unlisted = sorted(f"{k} (in {n})" for n, ks in keys_in.items() for k in ks if k not in weight_map)
        if unlisted:
            raise ConversionError(f"{index}: tensors present in shard files but missing from the index: {unlisted}")
        return {key: files[name] for key, name in weight_map.items()}

    def _keys_in(self, path: Path) -> list[str]:
        if not path.is_file():
            raise ConversionError(f"{path}: weight file named by the checkpoint is missing")
        return list(self._handle(path).keys())

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                if path.suffix == ".safetensors":
                    self._handles[path] = SafetensorsFile(path)
                else:
                    self._handles[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except ConversionError:
                raise
            except Exception as e:  # torch.load raises many types for a corrupt file
                raise ConversionError(f"{path}: cannot read weight file (truncated or corrupt?): {e}") from e
        return self._handles[path]

    # --- access -----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k in self.file_of if not k.endswith(IGNORED_SUFFIXES)]

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.file_of[key])
        return tuple(handle[key].shape) if isinstance(handle, dict) else handle.shape(key)

    def read(self, key: str) -> torch.Tensor:
        path = self.file_of[key]
        handle = self._handle(path)
        self.reads[key] += 1
        try:
            if isinstance(handle, dict):
                return handle[key].clone()  # detach from the mmap'd file: it is closed when done
            return handle.read(key)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {key!r} (truncated or corrupt file?): {e}") from e

    def read_rows_into(self, key: str, blocks, out: torch.Tensor) -> None:
        """Rows of `key` into rows of `out`: (src, dst, n) blocks, as Transform.placement gives them."""
        path = self.file_of[key]
        handle = self._handle(path)
        self.reads[key] += 1
        try:
            if isinstance(handle, dict):
                for src, dst, rows in blocks:
                    out[dst:dst + rows] = handle[key][src:src + rows]
            else:
                handle.read_rows_into(key, blocks, out)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {key!r} (truncated or corrupt file?): {e}") from e

    def close(self) -> None:
        self._handles.clear()


def tensor_dtype(reader: HfCheckpointReader, key: str) -> torch.dtype:
    handle = reader._handle(reader.file_of[key])
    return handle[key].dtype if isinstance(handle, dict) else handle.dtype(key)
