"""Read an HF checkpoint folder tensor by tensor: safetensors (single or sharded with an index) or
pytorch_model.bin (`torch.load(weights_only=True, mmap=True)`). Shapes come from the headers, so
every check runs before any data is read; `read` records what was consumed for the coverage check.
FP8 weights with block scales (converters/fp8.py) are dequantized here, so everything above this layer sees
ordinary tensors: a scale is not a key of its own and is consumed with its weight.
"""
import json
from collections import Counter
from pathlib import Path

import torch

from converters.errors import ConversionError
from converters.fp8 import Fp8Dequantization, dequantize_rows, pair_scales, rows_per_chunk
from converters.safetensors_file import SafetensorsFile

# Buffers some older checkpoints carry that are recomputed by every model, never weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class _Reads(Counter):
    """Reads per key, where a block scale is always counted as often as its FP8 weight: the coverage check
    then sees every scale consumed exactly once, however the weight is read or peeked at."""

    def __init__(self, scale_of: dict[str, str]):
        super().__init__()
        self.scale_of = scale_of

    def __setitem__(self, key, count):
        super().__setitem__(key, count)
        if key in self.scale_of:
            super().__setitem__(self.scale_of[key], count)

    def copy(self) -> "_Reads":
        twin = _Reads(self.scale_of)
        dict.update(twin, self)
        return twin


class HfCheckpointReader:
    def __init__(self, folder: str | Path, fp8: Fp8Dequantization | None = None):
        """`fp8`: from converters.fp8.fp8_dequantization; None for a config without quantization_config (an
        FP8 tensor is then an error naming it)."""
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = self._locate_tensors()
        self.fp8 = fp8
        listed = [k for k in self.file_of if not k.endswith(IGNORED_SUFFIXES)]
        self.scale_of: dict[str, str] = pair_scales({k: self._raw_dtype(k) for k in listed},
                                                    {k: self.shape(k) for k in listed}, self.file_of, fp8)
        self._scales = set(self.scale_of.values())
        self.reads: Counter[str] = _Reads(self.scale_of)

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
        """Tensor keys the model may use; FP8 block scales are part of their weight, not keys of their own."""
        return [k for k in self.file_of if not k.endswith(IGNORED_SUFFIXES) and k not in self._scales]

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.file_of[key])
        return tuple(handle[key].shape) if isinstance(handle, dict) else handle.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `read` returns: an FP8 weight's dequantized dtype, otherwise the stored one."""
        return self.fp8.dtype if key in self.scale_of else self._raw_dtype(key)

    def _raw_dtype(self, key: str) -> torch.dtype:
        handle = self._handle(self.file_of[key])
        return handle[key].dtype if isinstance(handle, dict) else handle.dtype(key)

    def read(self, key: str) -> torch.Tensor:
        if key in self.scale_of:
            shape = self.shape(key)
            tensor = torch.empty(shape, dtype=self.fp8.dtype)
            self.read_rows_into(key, [(0, 0, shape[0])], tensor)
            return tensor
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
            if key in self.scale_of:
                self._dequantize_rows_into(key, blocks, out)
            elif isinstance(handle, dict):
                for src, dst, rows in blocks:
                    out[dst:dst + rows] = handle[key][src:src + rows]
            else:
                handle.read_rows_into(key, blocks, out)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {key!r} (truncated or corrupt file?): {e}") from e

    def _dequantize_rows_into(self, key: str, blocks, out: torch.Tensor) -> None:
        """Reads the FP8 rows a chunk at a time and writes them dequantized: the working memory is one chunk
        (rows_per_chunk) plus the weight's scale grid, never a second copy of the weight."""
        scale = self._read_raw(self.scale_of[key])
        cols = self.shape(key)[1]
        handle = self._handle(self.file_of[key])
        step = rows_per_chunk(cols)
        for src, dst, rows in blocks:
            for start in range(0, rows, step):
                n = min(step, rows - start)
                if isinstance(handle, dict):
                    quantized = handle[key][src + start:src + start + n]
                else:
                    quantized = torch.empty((n, cols), dtype=self._raw_dtype(key))
                    handle.read_rows_into(key, [(src + start, 0, n)], quantized)
                out[dst + start:dst + start + n] = dequantize_rows(quantized, scale, src + start, self.fp8.block,
                                                                   self.fp8.dtype)

    def _read_raw(self, key: str) -> torch.Tensor:
        handle = self._handle(self.file_of[key])
        return handle[key].clone() if isinstance(handle, dict) else handle.read(key)

    def close(self) -> None:
        self._handles.clear()
