"""What a user watches: metrics.jsonl records, evaluation, TensorBoard events, the recorded config."""
import json
import math

from megaswift.checkpointing.layout import read_meta, resolve_checkpoint
from tests.train.runner import pt_flags, run_pt


def test_metrics_eval_tensorboard_and_recorded_config(demo_data, tmp_path):
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=2, data__split="90,10,0",
                           train__eval_interval=2, train__eval_iters=2, logging__tensorboard="true",
                           checkpoint__save=tmp_path / "ckpt"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_s"} <= set(record)
        assert record["tokens_per_s"] > 0 and math.isfinite(record["grad_norm"])
    # One warmup step (megatron-core's schedule starts at lr 0), then the peak.
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == 1e-3
    assert [e["step"] for e in evals] == [2] and math.isfinite(evals[0]["eval_loss"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 2 | loss" in proc.stdout + proc.stderr
    meta = read_meta(resolve_checkpoint(tmp_path / "ckpt"))
    assert meta["config"]["train"]["train_iters"] == 2 and meta["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert (resolve_checkpoint(tmp_path / "ckpt") / "hf_assets" / "tokenizer.json").is_file()
