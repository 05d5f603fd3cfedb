"""A checkpoint saved by `megaswift pt` (fp32 on CPU, from a bf16 preset) exports to HF and verifies."""
import json

from converters import mcore2hf
from tests.train.runner import pt_flags, run_pt


def test_pt_checkpoint_exports_with_its_real_dtype(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_pt(pt_flags(demo_data, tmp_path / "logs", train__train_iters=1, checkpoint__save=ckpt))
    out = tmp_path / "hf"
    report = mcore2hf(ckpt, out, verify=True, progress=False)
    assert report["logits"]["max_abs_diff"] <= report["logits"]["threshold"]
    config = json.loads((out / "config.json").read_text())
    # The preset says bfloat16, but CPU training stored fp32: config.json must say what is on disk.
    assert {config.get(k) for k in ("torch_dtype", "dtype")} - {None} == {"float32"}
    assert (out / "tokenizer.json").is_file()
