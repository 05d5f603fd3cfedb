"""Packing through Transformer Engine's THD attention (megatron-core PackedSeqParams) trains exactly like
the same samples one per row. Needs a CUDA GPU and Transformer Engine: run by tests/gpu/run.sh.

bf16 (TE has no fp32 THD attention), so equality is within stated tolerances, set from the same
comparison run in bf16 on the CPU with the local spec (loss 2.4e-5 relative, gradients 4.4% relative
L2 over all parameters, 5.8% for the worst tensor) with about 3x margin, and checked against a control
in which attention leaks across samples (gradients 80% off): a leak cannot pass.
"""
import json
import os
import subprocess
import sys

import pytest

from megaswift.models.builder import transformer_engine_available
from tests.torchrun import REPO, python_path

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not transformer_engine_available(),
    reason="needs a CUDA GPU and Transformer Engine (run tests/gpu/run.sh on a GPU machine)")]

LOSS_RTOL = 5e-4          # packed vs one-per-row loss, relative
GRAD_RTOL_ALL = 0.15      # relative L2 difference of all gradients together
GRAD_RTOL_TENSOR = 0.3    # relative L2 difference of any one parameter's gradient
CONTROL_MIN = 0.5         # a leaking control must be at least this far off (all gradients together)


def _python(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": python_path(), "OMP_NUM_THREADS": "4"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode})\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-8000:]}"
    return proc


def test_thd_packed_loss_and_gradients_equal_one_sample_per_row(tmp_path):
    out = tmp_path / "result.json"
    _python([str(REPO / "tests/gpu/packed_thd_worker.py"), "--layer-spec", "te", "--precision", "bf16",
             "--out", str(out)])
    r = json.loads(out.read_text())
    report = json.dumps(r, indent=1)[:6000]
    # The path under test really ran: TE attention, one THD micro-batch with PackedSeqParams.
    assert r["packed_attention"] == "thd" and r["attention_class"] == "TEDotProductAttention", report
    assert r["has_packed_seq_params"] and r["packed_shape"] == [1, r["rows"]["packed"] * 128], report
    assert r["rows"]["packed"] < r["rows"]["plain"], report

    losses, packed, control = r["losses"], r["grad_rel_diff"]["packed"], r["grad_rel_diff"]["control"]
    assert losses["packed"] == pytest.approx(losses["plain"], rel=LOSS_RTOL), report
    assert packed["__all__"] < GRAD_RTOL_ALL, report
    worst = max(packed, key=packed.get)
    assert packed[worst] < GRAD_RTOL_TENSOR, f"{worst}: {packed[worst]}\n{report}"
    # The comparison can tell: attention that crosses samples is far outside the tolerance.
    assert control["__all__"] > max(CONTROL_MIN, 4 * packed["__all__"]), report


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _write_alpaca(path, count=8):
    rows = []
    for i in range(count):
        n = 3 + (i * 5) % 17
        rows.append({"instruction": f"Repeat {n} words starting at {WORDS[i]}.", "input": "",
                     "output": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_megaswift_sft_packed_thd_trains_like_unpacked(tiny_tokenizer_dir, tmp_path):
    """The whole trainer (schedule, data source, forward step) on one GPU: micro-batches of 2 packed rows
    (one THD sequence of 2 x 128 tokens) vs the same 8 samples one per row, same initial weights (seed)."""
    from transformers import AutoTokenizer

    from megaswift.data.sft import PackedSFTDataset, SFTDataSettings, preprocess_sft

    data, cache, seq = _write_alpaca(tmp_path / "train.jsonl"), tmp_path / "cache", 128
    samples = preprocess_sft(SFTDataSettings(datasets=(str(data),), max_length=seq, loss_on="all_assistant"),
                             AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), cache, report=False).dataset
    packed_rows = len(PackedSFTDataset(samples, seq, 0))
    assert packed_rows % 2 == 0 and packed_rows < len(samples), (packed_rows, len(samples))

    def sft(packing: bool, rows: int) -> dict[int, float]:
        out = tmp_path / ("packed" if packing else "unpacked")
        _python(["-m", "megaswift", "sft", "--model.preset", "tiny-llama", "--model.layer_spec", "te",
                 "--data.datasets", str(data), "--data.tokenizer", str(tiny_tokenizer_dir),
                 "--data.seq_length", str(seq), "--data.cache_dir", str(cache), "--data.packing", str(packing).lower(),
                 "--data.loss_on", "all_assistant", "--train.micro_batch_size", "2",
                 "--train.global_batch_size", str(rows), "--train.train_iters", "3", "--train.lr", "1e-3",
                 "--train.lr_warmup_iters", "0", "--train.precision", "bf16", "--logging.output_dir", str(out),
                 "--logging.progress_bar", "false", "--logging.tensorboard", "false"])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {rec["step"]: rec["loss"] for rec in records if "loss" in rec}

    packed, unpacked = sft(True, packed_rows), sft(False, len(samples))
    assert sorted(packed) == sorted(unpacked) == [1, 2, 3], (packed, unpacked)
    assert packed[1] == pytest.approx(unpacked[1], rel=LOSS_RTOL), (packed, unpacked)  # same weights
    for step in (2, 3):  # after bf16 Adam updates from gradients equal within GRAD_RTOL_ALL
        assert packed[step] == pytest.approx(unpacked[step], rel=1e-2), (packed, unpacked)
