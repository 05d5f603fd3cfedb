"""FP8 checkpoints with block-wise scales (DeepSeek-V3 and many later releases): each 2-D weight is stored as
float8_e4m3fn beside `<name>_scale_inv`, one float per (block_rows x block_cols) tile, tiles at the right and
bottom edges partial. The reference dequantization (DeepSeek-V3's inference `weight_dequant`) multiplies in
fp32 and rounds once to the target dtype:

    weight[i, j] = (fp32(q[i, j]) * fp32(scale_inv[i // block_rows, j // block_cols])).to(dtype)

This module parses `quantization_config`, pairs weights with their scales by the names in the file headers,
and dequantizes rows of a weight, so HfCheckpointReader hands the converter ordinary tensors. Every other
low-precision or integer weight dtype (e5m2, packed int8/uint8, float4, ...) is refused by name: reading it
as a float would silently produce a different model.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.errors import ConversionError

FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
# Newer torch dtypes, absent before torch 2.7 / 2.8 (pyproject allows 2.6): None there.
E8M0, FP4 = getattr(torch, "float8_e8m0fnu", None), getattr(torch, "float4_e2m1fn_x2", None)
# Dtypes a scale may be stored in; each converts to fp32 exactly (e8m0 is a power of two).
SCALE_DTYPES = tuple(d for d in (torch.float32, torch.bfloat16, torch.float16, E8M0) if d is not None)
# Weight dtypes that hold quantized values needing extra information to read. Anything here except e4m3 with
# its scales is an error: no other dtype gets this far silently.
QUANTIZED_DTYPES = {d for d in (FP8_DTYPE, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, E8M0, FP4,
                                torch.int8, torch.uint8) if d is not None}
SUPPORTED = ("supported: float32, bfloat16 and float16 weights, and float8_e4m3fn weights with block-wise "
             "`<name>_scale_inv` scales (quantization_config {quant_method: fp8, fmt: e4m3, weight_block_size})")
# HF config dtype names -> the dtype dequantized weights get when no --dtype is given.
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHUNK_BYTES = 64 << 20  # fp32 working memory per dequantized chunk of rows: streaming stays a few tensors


@dataclass(frozen=True)
class Fp8Dequantization:
    block: tuple[int, int]  # (rows, cols) of one scale tile
    dtype: torch.dtype      # what the weights are dequantized to: the training dtype


def fp8_dequantization(hf: dict, config_file: Path, dtype: torch.dtype | None) -> tuple[dict, Fp8Dequantization | None]:
    """(config without quantization_config, how to dequantize) for an FP8 config, (hf, None) for one without.
    The recorded config must not claim FP8 weights once they are dequantized (mcore2hf writes it back), so
    quantization_config is dropped here, with one line on stderr saying so. `dtype`: the --dtype asked for;
    without it, the config's own dtype (DeepSeek-V3: bfloat16), as the reference conversion does."""
    quant = hf.get("quantization_config")
    if quant is None:
        return hf, None
    where = f"{config_file}: quantization_config"
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConversionError(f"{where}: quant_method {method!r} is not supported; {SUPPORTED}. Dequantize the "
                              f"checkpoint with its own tooling first")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConversionError(f"{where}: fmt {quant['fmt']!r} is not supported; {SUPPORTED}")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ConversionError(f"{where}: activation_scheme {quant['activation_scheme']!r} is not supported "
                              f"(its per-tensor activation scales have no place in a training checkpoint); "
                              f"expected 'dynamic'")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConversionError(f"{where}: weight_block_size is {block!r}; expected two positive integers such as "
                              f"[128, 128] (per-tensor FP8 scales are not supported; {SUPPORTED})")
    if dtype is None:
        named = hf.get("dtype", hf.get("torch_dtype"))
        dtype = CONFIG_DTYPES.get(named, torch.bfloat16)
    fp8 = Fp8Dequantization(block=(block[0], block[1]), dtype=dtype)
    print(f"megaswift convert: {config_file}: dequantizing FP8 (e4m3, {block[0]}x{block[1]} blocks) weights to "
          f"{str(dtype).removeprefix('torch.')}; quantization_config is dropped from the recorded config",
          file=sys.stderr)
    return {k: v for k, v in hf.items() if k != "quantization_config"}, fp8


def pair_scales(dtype_of: dict[str, torch.dtype], shape_of: dict[str, tuple[int, ...]], file_of: dict[str, Path],
                fp8: Fp8Dequantization | None) -> dict[str, str]:
    """FP8 weight key -> its scale key, from the headers alone (no data read). Errors name both keys: an FP8
    weight without its scale, a scale without an FP8 weight, a scale grid that does not fit the weight."""
    scale_of = {}
    for key, dtype in dtype_of.items():
        if dtype not in QUANTIZED_DTYPES or (dtype == E8M0 and key.endswith(SCALE_SUFFIX)):
            continue
        scale = key + SCALE_SUFFIX
        if dtype != FP8_DTYPE:
            raise ConversionError(f"{file_of[key]}: tensor {key!r} has dtype {str(dtype).removeprefix('torch.')}, "
                                  f"which megaswift cannot dequantize; {SUPPORTED}")
        if scale not in dtype_of:
            raise ConversionError(f"{file_of[key]}: tensor {key!r} is float8_e4m3fn but its block scales {scale!r} "
                                  f"are missing from the checkpoint; {SUPPORTED}")
        if fp8 is None:
            raise ConversionError(f"{file_of[key]}: tensor {key!r} is float8_e4m3fn with scales {scale!r}, but "
                                  f"config.json has no quantization_config giving the block size; expected "
                                  f"{{quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}} or as published")
        _check_scale(key, shape_of[key], scale, shape_of[scale], dtype_of[scale], fp8.block, file_of)
        scale_of[key] = scale
    paired = set(scale_of.values())
    for key in dtype_of:
        if key.endswith(SCALE_SUFFIX) and key not in paired:
            weight = key.removesuffix(SCALE_SUFFIX)
            found = (f"is {str(dtype_of[weight]).removeprefix('torch.')}, not float8_e4m3fn" if weight in dtype_of
                     else "is missing")
            raise ConversionError(f"{file_of[key]}: tensor {key!r} is a block scale, but the weight it scales, "
                                  f"{weight!r}, {found}; {SUPPORTED}")
    return scale_of


def _check_scale(key, shape, scale, scale_shape, scale_dtype, block, file_of) -> None:
    if len(shape) != 2:
        raise ConversionError(f"{file_of[key]}: FP8 tensor {key!r} has shape {list(shape)}; block-wise "
                              f"dequantization reads 2-D weights only")
    expected = [-(-shape[0] // block[0]), -(-shape[1] // block[1])]  # ceil: edge tiles are partial
    if list(scale_shape) != expected:
        raise ConversionError(f"{file_of[scale]}: scale {scale!r} has shape {list(scale_shape)}, but {key!r} of "
                              f"shape {list(shape)} in {block[0]}x{block[1]} blocks (weight_block_size) needs "
                              f"{expected}")
    if scale_dtype not in SCALE_DTYPES:
        raise ConversionError(f"{file_of[scale]}: scale {scale!r} has dtype {str(scale_dtype).removeprefix('torch.')};"
                              f" expected one of {', '.join(str(d).removeprefix('torch.') for d in SCALE_DTYPES)}")


def rows_per_chunk(cols: int) -> int:
    """Rows dequantized at a time: about CHUNK_BYTES of fp32 working memory, however large the weight."""
    return max(1, CHUNK_BYTES // (4 * max(cols, 1)))


def dequantize_rows(quantized: torch.Tensor, scale_inv: torch.Tensor, first_row: int, block: tuple[int, int],
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows [first_row, first_row + n) of a weight, given as its FP8 rows and the weight's whole scale grid,
    dequantized by the reference formula: one fp32 multiply per element, one rounding to `dtype`."""
    rows, cols = quantized.shape
    scale = scale_inv.float()[torch.arange(first_row, first_row + rows) // block[0]]  # (rows, column tiles)
    values = quantized.float()
    full = cols // block[1] * block[1]
    # Broadcast each scale over its tile's columns in place, never materialising a weight-sized scale.
    if full:
        values[:, :full].unflatten(1, (full // block[1], block[1])).mul_(scale[:, :full // block[1], None])
    if full < cols:
        values[:, full:].mul_(scale[:, -1:])  # the partial tile at the right edge
    return values.to(dtype)
