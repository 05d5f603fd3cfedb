"""FP8 checkpoints (float8_e4m3fn weights + block-wise `weight_scale_inv`, as DeepSeek-V3 ships them): hf2mcore
dequantizes them bit-exactly as the reference formula does, fp32(q) * fp32(scale_inv[block]) rounded once to
the training dtype. The tiny checkpoints here are quantized and dequantized by hand, tile by tile, with a
block size that leaves partial tiles at the right and bottom edges of every matrix; transformers' own FP8
loader checks the whole model's logits where its dequantization applies (blocks that divide the matrices),
and the verification gate runs transformers on a copy dequantized by the reference formula where it does not.
Other quantized dtypes, and FP8 weights without their scales, are errors that name the tensors."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import hf2mcore, mcore2hf
from converters.fp8 import Fp8Dequantization
from converters.hf_reader import HfCheckpointReader
from megaswift.cli.main import main

FP8_MAX = 448.0  # largest finite float8_e4m3fn
PARTIAL_BLOCK = [24, 40]  # 64 rows -> 24+24+16, 128 -> 5*24+8; 64 cols -> 40+24, 128 -> 3*40+8
KEY = "model.layers.0.mlp.up_proj.weight"  # [128, 64]
SCALE = KEY + "_scale_inv"


def tiles(shape, block):
    """(row slice, col slice, tile row, tile col) of every block, the edge ones partial."""
    for i in range(math.ceil(shape[0] / block[0])):
        for j in range(math.ceil(shape[1] / block[1])):
            yield slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]), i, j


def quantize_by_hand(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tile scaled so its largest magnitude maps to the largest e4m3 value, as FP8 releases are made."""
    quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(math.ceil(weight.shape[0] / block[0]), math.ceil(weight.shape[1] / block[1]))
    for rows, cols, i, j in tiles(weight.shape, block):
        tile = weight[rows, cols].float()
        scale_inv[i, j] = tile.abs().max() / FP8_MAX
        quantized[rows, cols] = (tile / scale_inv[i, j]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale_inv


def dequantize_by_hand(quantized: torch.Tensor, scale_inv: torch.Tensor, block, dtype) -> torch.Tensor:
    out = torch.empty(quantized.shape, dtype=dtype)
    for rows, cols, i, j in tiles(quantized.shape, block):
        out[rows, cols] = (quantized[rows, cols].float() * scale_inv[i, j].float()).to(dtype)
    return out


def quantized_by_release(key: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek-V3 quantizes: the linear layers; embeddings, the head, the router and norms stay bf16."""
    return tensor.dim() == 2 and not key.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight"))


def save_fp8_checkpoint(source, folder, block) -> dict[str, torch.Tensor]:
    """An FP8 copy of the HF folder `source`; returns the FP8 weights and their scales as saved."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    for key in [k for k, t in tensors.items() if quantized_by_release(k, t)]:
        tensors[key], tensors[key + "_scale_inv"] = quantize_by_hand(tensors[key], block)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block,
                                     "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory, hf_model_dirs):
    """family -> (FP8 folder with PARTIAL_BLOCK tiles, its tensors as saved); built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"fp8-{family}") / "hf"
            cache[family] = folder, save_fp8_checkpoint(hf_model_dirs(family, "bf16"), folder, PARTIAL_BLOCK)
        return cache[family]
    return get


@pytest.fixture
def fp8_checkpoint(fp8_checkpoints):
    return fp8_checkpoints("llama")


# DeepSeek-V3's layout is what FP8 releases use: MLA projections, routed and shared experts.
@pytest.mark.parametrize("family", ["llama", "deepseek-v3"])
def test_hf2mcore_dequantizes_like_the_reference_formula(family, fp8_checkpoints, tmp_path, capsys):
    """Every FP8 weight arrives in megatron-core's checkpoint as the hand dequantization in bf16 (the config's
    dtype), bit for bit (read back through mcore2hf, bit-exact itself); the rest untouched. The exported
    config no longer claims FP8."""
    source, saved = fp8_checkpoints(family)
    hf2mcore(source, tmp_path / "mcore", verify=False, progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "quantization_config" in line]
    assert len(notes) == 1 and "dequantizing FP8" in notes[0] and "24x40" in notes[0] and "bfloat16" in notes[0]
    recorded = json.loads((tmp_path / "mcore" / "iter_0000000" / "megaswift.json").read_text())["hf_config"]
    assert "quantization_config" not in recorded

    mcore2hf(tmp_path / "mcore", tmp_path / "back", verify=False, progress=False)
    back = {k: t for file in (tmp_path / "back").glob("*.safetensors") for k, t in load_file(file).items()}
    fp8_keys = [k for k in saved if saved[k].dtype == torch.float8_e4m3fn]
    assert len(fp8_keys) >= 7 * 4 and back.keys() == {k for k in saved if not k.endswith("_scale_inv")}
    expected = {k: dequantize_by_hand(saved[k], saved[k + "_scale_inv"], PARTIAL_BLOCK, torch.bfloat16)
                if k in fp8_keys else saved[k] for k in back}
    wrong = [k for k in back if back[k].dtype != expected[k].dtype or not torch.equal(back[k], expected[k])]
    assert not wrong, f"not the hand dequantization: {wrong}"
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in exported and exported.get("dtype", exported.get("torch_dtype")) == "bfloat16"


def test_reader_dequantizes_rows_anywhere_and_consumes_scales_with_their_weight(fp8_checkpoint, monkeypatch):
    """Straight into fp32 (--dtype fp32: no bf16 rounding on the way), for row ranges that start and end
    inside a tile, as fused QKV / gate-up placements read them, in chunks of 7 rows (streaming: chunks
    straddle tiles); the scale is counted with its weight."""
    source, saved = fp8_checkpoint
    monkeypatch.setattr("converters.fp8.CHUNK_BYTES", 7 * 128 * 4)  # 7 fp32 rows of 128
    key = "model.layers.1.mlp.down_proj.weight"  # [64, 128]: tiles of 24 rows, 40 cols, both edges partial
    reader = HfCheckpointReader(source, Fp8Dequantization(block=tuple(PARTIAL_BLOCK), dtype=torch.float32))
    assert key + "_scale_inv" not in reader.keys() and reader.dtype(key) == torch.float32
    out = torch.full((40, 128), float("nan"))
    reader.read_rows_into(key, [(5, 0, 30), (50, 30, 10)], out)
    by_hand = dequantize_by_hand(saved[key], saved[key + "_scale_inv"], PARTIAL_BLOCK, torch.float32)
    assert torch.equal(out, torch.cat([by_hand[5:35], by_hand[50:60]]))
    assert reader.reads[key] == reader.reads[key + "_scale_inv"] == 1
    reader.reads[key] -= 1  # hf2mcore's peek at a tensor (tied-head check) un-counts it: the scale follows
    assert reader.reads[key + "_scale_inv"] == 0


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_power_of_two_scales_stored_as_e8m0(fp8_checkpoint, tmp_path, weights_file):
    """ue8m0 releases store each scale as a bare exponent (float8_e8m0fnu); either weight file format."""
    source, saved = fp8_checkpoint
    scale = torch.exp2(torch.ceil(torch.log2(saved[SCALE]))).to(torch.float8_e8m0fnu)
    tensors = {KEY: saved[KEY], SCALE: scale}
    if weights_file.endswith(".safetensors"):
        save_file(tensors, tmp_path / weights_file)
    else:
        torch.save(tensors, tmp_path / weights_file)
    reader = HfCheckpointReader(tmp_path, Fp8Dequantization(block=tuple(PARTIAL_BLOCK), dtype=torch.bfloat16))
    assert reader.keys() == [KEY]
    assert torch.equal(reader.read(KEY), dequantize_by_hand(saved[KEY], scale, PARTIAL_BLOCK, torch.bfloat16))


def test_transformers_fp8_loader_agrees(tmp_path, hf_model_dirs):
    """hf2mcore's verification gate loads the FP8 folder with transformers (which dequantizes it on CPU) and
    compares the logits with megatron-core's on the converted checkpoint. transformers derives the tile size
    from the scale grid, so it applies where blocks divide the matrices: 16x16 here."""
    source = tmp_path / "hf"
    save_fp8_checkpoint(hf_model_dirs("llama", "bf16"), source, [16, 16])
    report = hf2mcore(source, tmp_path / "mcore", verify=True, progress=False)
    assert report["passed"] and report["logits"]["max_abs_diff"] <= 1e-4, report
    assert report["logits"]["fp8_weights"] == "transformers' FP8 loader"
    assert report["coverage"]["hf_tensors"] == len(load_file(source / "model.safetensors"))  # scales included


def test_default_verification_passes_with_partial_blocks(fp8_checkpoint, tmp_path):
    """Edge tiles that do not fill a block (DeepSeek-V3's 576-row kv_a_proj in 128x128 blocks; every matrix
    here): transformers' CPU FP8 loader refuses them, so the gate runs transformers on a copy dequantized by
    the reference formula; the default verification passes on this valid checkpoint and leaves no copy."""
    source, _ = fp8_checkpoint
    report = hf2mcore(source, tmp_path / "mcore", progress=False)
    assert report["passed"] and report["logits"]["max_abs_diff"] <= 1e-4, report
    assert "reference formula" in report["logits"]["fp8_weights"]
    assert sorted(p.name for p in (tmp_path / "mcore").iterdir()) == ["iter_0000000", "latest", "verification.json"]


def convert_error(capsys, folder, tmp_path) -> str:
    code = main(["convert", "hf2mcore", str(folder), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    return err


def edited_copy(fp8_checkpoint, tmp_path, edit_tensors=None, edit_config=None):
    folder = tmp_path / "hf"
    shutil.copytree(fp8_checkpoint[0], folder)
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_fp8_weight_without_its_scale(fp8_checkpoint, tmp_path, capsys):
    folder = edited_copy(fp8_checkpoint, tmp_path, lambda t: t.pop(SCALE))
    err = convert_error(capsys, folder, tmp_path)
    assert KEY in err and SCALE in err and "missing" in err and str(folder / "model.safetensors") in err


@pytest.mark.parametrize("dtype,name", [(torch.float8_e5m2, "float8_e5m2"), (torch.uint8, "uint8"),
                                        (torch.int8, "int8")])
def test_other_quantized_dtypes_are_refused_by_name(fp8_checkpoint, tmp_path, capsys, dtype, name):
    """e5m2 without the scales e4m3 comes with, and packed integer weights: each named with what is supported."""
    def replace(tensors):
        tensors.pop(SCALE)
        tensors[KEY] = tensors[KEY].float().to(dtype) if dtype.is_floating_point else tensors[KEY].view(dtype)
    err = convert_error(capsys, edited_copy(fp8_checkpoint, tmp_path, replace), tmp_path)
    assert KEY in err and name in err and "supported: float32, bfloat16 and float16" in err and "e4m3fn" in err


def test_scale_grid_that_does_not_fit_the_block_size(fp8_checkpoint, tmp_path, capsys):
    folder = edited_copy(fp8_checkpoint, tmp_path, edit_config=lambda c: c["quantization_config"].update(
        weight_block_size=[128, 128]))
    err = convert_error(capsys, folder, tmp_path)
    assert "_scale_inv" in err and "[1, 1]" in err and "128x128" in err


def test_scale_for_a_weight_that_is_not_fp8(fp8_checkpoint, tmp_path, capsys):
    norm = "model.norm.weight"
    folder = edited_copy(fp8_checkpoint, tmp_path, lambda t: t.__setitem__(norm + "_scale_inv", torch.ones(1, 1)))
    err = convert_error(capsys, folder, tmp_path)
    assert norm + "_scale_inv" in err and "bfloat16, not float8_e4m3fn" in err


@pytest.mark.parametrize("config_edit,expected", [
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq", "bits": 4}), "'gptq' is not supported"),
    (lambda c: c["quantization_config"].update(activation_scheme="static"), "'static' is not supported"),
])
def test_quantization_configs_that_cannot_be_read(fp8_checkpoint, tmp_path, capsys, config_edit, expected):
    folder = edited_copy(fp8_checkpoint, tmp_path, edit_config=config_edit)
    err = convert_error(capsys, folder, tmp_path)
    assert expected in err and str(folder) in err
