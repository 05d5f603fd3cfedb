"""LoRA through the real `megaswift sft` in the layouts the model-level tests do not reach: PP=2 with a
virtual pipeline, DP=2 with the distributed optimizer and the fused loss, and TP=2+SP on packed rows with
per-token loss weights. Each equals the same LoRA job in one process (loss and gradient norm per step).

Runs start from a tiny 4-layer Llama converted with a PEFT LoRA adapter imported beside it (B non-zero, so
A trains from step 1). One step is the whole data set (global batch = all rows), so packed and unpacked
rows train the same samples, and the token-level loss (sum of weighted token losses / sum of weights over
the global batch) makes them equal. All 2-process runs share ONE torchrun launch."""
import json
from pathlib import Path

import pytest
import torch

from megaswift.data.sft import PackedSFTDataset, SFTDataSettings, preprocess_sft
from tests.torchrun import run_torchrun
from tests.train.runner import run_pt
from tests.train.test_sft import LOSS_SCALE, _write_alpaca

SEQ, STEPS, SAMPLES = 128, 3, 8
LAYOUTS = {  # name -> flags of a 2-process run of the same job
    "pp2_vpp2": {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
    "dp2_distopt_fused": {"parallel.distributed_optimizer": "true", "train.fused_loss": "true"},
    "tp2_sp_packed": {"parallel.tensor": 2, "parallel.sequence_parallel": "true", "data.packing": "true"},
}


@pytest.fixture(scope="module")
def lora_job(tiny_tokenizer_dir, tmp_path_factory):
    """(flags of the one-process unpacked LoRA job, packed row count)."""
    from transformers import AutoTokenizer

    from converters import hf2mcore
    from tests.converters.test_lora_peft import make_peft_adapter
    from tests.converters.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("lora_trainer")
    hf_dir = save_tiny_hf_model("tiny-llama", root / "hf", torch.float32, tiny_tokenizer_dir)
    hf2mcore(hf_dir, root / "base", verify=False, progress=False,
             adapter=make_peft_adapter(hf_dir, root / "peft", dora=False))
    data = _write_alpaca(root / "train.jsonl", SAMPLES)
    (root / "weights.json").write_text(json.dumps(LOSS_SCALE))
    settings = SFTDataSettings(datasets=(str(data),), max_length=SEQ, loss_on="all_assistant",
                               loss_scale=str(root / "weights.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    samples = preprocess_sft(settings, tokenizer, root / "probe", report=False).dataset
    assert {0.0, 0.5, 1.0, 3.0} <= {w for row in samples["loss_scale"] for w in row}
    packed_rows = len(PackedSFTDataset(samples, SEQ, 0))
    assert packed_rows < SAMPLES and packed_rows % 2 == 0, packed_rows
    flags = {"checkpoint.load": root / "base", "tuner.type": "lora", "model.layer_spec": "local",
             "data.datasets": data, "data.tokenizer": tiny_tokenizer_dir, "data.seq_length": SEQ,
             "data.loss_on": "all_assistant", "data.loss_scale": root / "weights.json",
             "train.micro_batch_size": 1, "train.global_batch_size": SAMPLES, "train.train_iters": STEPS,
             "train.lr": 1e-3, "train.lr_warmup_iters": 0, "train.precision": "fp32",
             "logging.progress_bar": "false", "logging.tensorboard": "false"}
    return flags, packed_rows


def _flags(values: dict) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def _records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_lora_layouts_equal_one_process(lora_job, tmp_path):
    job, packed_rows = lora_job
    job = {**job, "data.cache_dir": tmp_path / "cache"}  # preprocessed once, by the one-process run
    run_pt(_flags({**job, "logging.output_dir": tmp_path / "single"}),
           command=("-m", "megaswift", "sft"))
    single = _records(tmp_path / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    assert single[STEPS]["loss"] < single[1]["loss"]  # the adapter trains
    runs = []
    for name, layout in LAYOUTS.items():
        rows = packed_rows if layout.get("data.packing") == "true" else SAMPLES
        runs.append(_flags({**job, **layout, "train.global_batch_size": rows, "logging.output_dir": tmp_path / name}))
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    run_torchrun([Path(__file__).with_name("sft_runs_worker.py"), tmp_path / "runs.json"], nproc=2, timeout=400)
    for name in LAYOUTS:
        got = _records(tmp_path / name)
        assert sorted(got) == list(range(1, STEPS + 1)), name
        for step, expected in single.items():
            assert got[step]["loss"] == pytest.approx(expected["loss"], rel=1e-5), (name, step, got, single)
            assert got[step]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (name, step, got, single)
