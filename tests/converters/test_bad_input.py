"""Bad input through the CLI: a clear error naming the file and key, exit code 1, and nothing left in
OUT_DIR's place that looks finished (no OUT_DIR, no temporary folders)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaswift.checkpointing.integrity import FILES_KEY, record_files
from megaswift.cli.main import main


def convert(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def copy_model(hf_model_dirs, tmp_path, family="llama"):
    folder = tmp_path / "hf"
    shutil.copytree(hf_model_dirs(family, "fp32"), folder)
    return folder


def assert_nothing_written(tmp_path, out_name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(out_name)]
    assert leftovers == [], f"left behind: {leftovers}"


def edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def rerecord_files(iteration_dir):
    """Records the files' current sizes and CRC32s in megaswift.json, as the writer of such files would."""
    meta_file = iteration_dir / "megaswift.json"
    meta = json.loads(meta_file.read_text())
    meta[FILES_KEY] = record_files(iteration_dir)
    meta_file.write_text(json.dumps(meta))


def test_missing_tensor(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    edit_weights(hf, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and "missing" in err and "model.layers.1.mlp.up_proj.weight" in err and str(hf) in err
    assert_nothing_written(tmp_path)


def test_extra_tensor(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    edit_weights(hf, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2, 2)))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and "model.layers.0.mlp.extra_proj.weight" in err and str(hf / "model.safetensors") in err
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 1000])
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and str(hf / "model.safetensors") in err and "truncated or corrupt" in err
    assert_nothing_written(tmp_path)


def test_shape_contradicting_config(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 96
    (hf / "config.json").write_text(json.dumps(config))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and "model.layers.0.mlp.gate_proj.weight" in err and "[128, 64]" in err and "[96, 64]" in err
    assert str(hf / "config.json") in err
    assert_nothing_written(tmp_path)


def test_unknown_architecture(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(config))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and "GPT2LMHeadModel" in err and "Qwen3MoeForCausalLM" in err and "MixtralForCausalLM" in err
    assert_nothing_written(tmp_path)


def test_non_empty_out_dir_needs_overwrite(tmp_path, hf_model_dirs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = convert(capsys, "hf2mcore", hf_model_dirs("llama", "fp32"), out, "--no-verify")
    assert code == 1 and str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    code, err = convert(capsys, "hf2mcore", hf_model_dirs("llama", "fp32"), out, "--no-verify", "--overwrite")
    assert code == 0, err
    assert (out / "latest").is_file() and not (out / "precious.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]


def test_pytorch_model_bin_input(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path, "qwen2")
    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out", "--verify")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "verification.json").read_text())["passed"] is True


def test_mcore2hf_rejects_unsupported_backend(tmp_path, converted_dirs, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted_dirs("llama", "fp32")[0], ckpt)
    backend = ckpt / "iter_0000000" / "metadata.json"
    backend.write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    rerecord_files(ckpt / "iter_0000000")  # as a zarr writer would have recorded it: the files are intact
    code, err = convert(capsys, "mcore2hf", ckpt, tmp_path / "out")
    assert code == 1 and str(backend) in err and "zarr" in err
    assert_nothing_written(tmp_path)


def test_mcore2hf_names_tensors_the_config_needs_but_the_checkpoint_lacks(tmp_path, converted_dirs, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted_dirs("llama", "fp32")[0], ckpt)
    meta_file = ckpt / "iter_0000000" / "megaswift.json"
    meta = json.loads(meta_file.read_text())
    meta["hf_config"]["architectures"] = ["Qwen2ForCausalLM"]  # expects q/k/v biases the checkpoint lacks
    meta_file.write_text(json.dumps(meta))
    code, err = convert(capsys, "mcore2hf", ckpt, tmp_path / "out")
    assert code == 1 and "decoder.layers.self_attention.linear_qkv.bias" in err and str(ckpt) in err
    assert_nothing_written(tmp_path)


def test_mcore2hf_on_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = convert(capsys, "mcore2hf", tmp_path / "empty", tmp_path / "out")
    assert code == 1 and "not a megaswift checkpoint" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("bad_size", ["lots", "5XB"])
def test_bad_max_shard_size(tmp_path, converted_dirs, capsys, bad_size):
    code, err = convert(capsys, "mcore2hf", converted_dirs("llama", "fp32")[0], tmp_path / "out",
                        "--max-shard-size", bad_size)
    assert code == 1 and bad_size in err
    assert_nothing_written(tmp_path)


def test_fused_tensors_of_different_dtypes(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    edit_weights(hf, lambda t: t.__setitem__(key, t[key].to(torch.bfloat16)))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1 and key in err and "model.layers.0.mlp.gate_proj.weight" in err and "different dtypes" in err
    assert_nothing_written(tmp_path)


def test_mcore2hf_refuses_a_checkpoint_whose_file_changed_since_it_was_saved(tmp_path, converted_dirs, capsys):
    """One flipped byte inside a weight leaves the file readable; only the CRC32 in megaswift.json tells."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted_dirs("llama", "fp32")[0], ckpt)
    data_file = max((ckpt / "iter_0000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # mid-file: inside tensor bytes, same size
    data_file.write_bytes(bytes(data))
    code, err = convert(capsys, "mcore2hf", ckpt, tmp_path / "out")
    assert code == 1 and str(data_file) in err and "CRC32" in err and "not exporting" in err, err
    assert_nothing_written(tmp_path)
