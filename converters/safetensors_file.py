"""Read tensors from a safetensors file with plain reads, not mmap: mapped pages of a large file stay
resident and count against the process, so reading a 2 GB checkpoint through mmap costs 2 GB of RSS.
The header is validated against the file size up front, so a truncated file fails before any work."""
import ctypes
import json
import struct
from pathlib import Path

import torch

from converters.errors import ConversionError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool,
          # Low-precision formats are read so converters/fp8.py can dequantize e4m3 and name the others.
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
          "F8_E5M2FNUZ": torch.float8_e5m2fnuz}
if hasattr(torch, "float8_e8m0fnu"):  # torch >= 2.7
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ConversionError(f"{path}: truncated or corrupt safetensors file (header of {header_len} "
                                      f"bytes, file of {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{path}: truncated or corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}; supported: "
                                      f"F32, BF16, F16, and F8_E4M3 with block-wise `_scale_inv` scales")
            expected = torch.Size(entry["shape"]).numel() * DTYPES[entry["dtype"]].itemsize
            if end - start != expected:
                raise ConversionError(f"{path}: tensor {key!r}: header gives {end - start} bytes for shape "
                                      f"{entry['shape']} {entry['dtype']} ({expected} expected)")
            if self.data_start + end > size:
                raise ConversionError(f"{path}: truncated or corrupt safetensors file: tensor {key!r} ends at byte "
                                      f"{self.data_start + end}, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def read(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        tensor = torch.empty(shape, dtype=self.dtype(key))
        self.read_rows_into(key, [(0, 0, shape[0] if shape else 1)], tensor)
        return tensor

    def read_rows_into(self, key: str, blocks, out: torch.Tensor) -> None:
        """Read rows [src, src + n) of tensor `key` into rows [dst, dst + n) of the contiguous CPU tensor
        `out` (same dtype and row size), for each (src, dst, n) in `blocks`: straight from the file
        into `out`'s memory, with no intermediate copy. Uninitialised memory is fine: every byte is
        overwritten, where a zero-filled buffer would touch every page twice."""
        shape, dtype = self.shape(key), self.dtype(key)
        if out.dtype != dtype or tuple(out.shape[1:]) != tuple(shape[1:]) or not out.is_contiguous():
            raise AssertionError(f"{key}: cannot read {dtype} rows of shape {shape[1:]} into {out.dtype} "
                                 f"{tuple(out.shape)}")
        row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize
        start = self.entries[key]["data_offsets"][0]
        with open(self.path, "rb", buffering=0) as f:
            for src, dst, rows in blocks:
                if rows <= 0:
                    continue
                # A ctypes view, not .numpy(): exporting to numpy marks the storage non-resizable, and
                # the checkpoint writer frees each written tensor's storage early (mcore_writer.py).
                address = out.data_ptr() + dst * row_bytes
                view = memoryview((ctypes.c_char * (rows * row_bytes)).from_address(address)).cast("B")
                f.seek(self.data_start + start + src * row_bytes)
                done = 0
                while done < len(view):  # one read(2) returns at most ~2 GiB
                    count = f.readinto(view[done:])
                    if not count:
                        raise ConversionError(f"{self.path}: truncated while reading tensor {key!r}")
                    done += count
