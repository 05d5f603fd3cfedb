"""mcore2hf --hf-config reads a foreign checkpoint's .metadata once: the check against the named config and the
tensor reader share it. The checkpoint here is a megaswift iteration folder without megaswift.json, the
simplest torch_dist folder another trainer could have written (Megatron-LM's own layouts are exported in
test_foreign_checkpoint.py); its export must still equal the HF model bit for bit."""
import builtins
import io
import shutil

import torch
from safetensors.torch import load_file

from converters import mcore2hf


def test_export_reads_metadata_once(tmp_path, hf_model_dirs, converted_dirs, monkeypatch):
    hf_dir = hf_model_dirs("llama", "fp32")
    foreign = tmp_path / "foreign" / "iter_0000100"
    shutil.copytree(converted_dirs("llama", "fp32")[0] / "iter_0000000", foreign)
    (foreign / "megaswift.json").unlink()

    opened = []
    real_open = io.open

    def recording_open(file, *args, **kwargs):  # torch's FileSystemReader opens through Path.open -> io.open
        if str(file).endswith(".metadata"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(builtins, "open", recording_open)
    out = tmp_path / "hf"
    mcore2hf(foreign, out, hf_config=hf_dir, verify=False, progress=False)
    monkeypatch.undo()

    assert opened == [str(foreign / ".metadata")]
    expected = load_file(hf_dir / "model.safetensors")
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
