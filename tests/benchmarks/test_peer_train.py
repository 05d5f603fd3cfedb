"""benchmarks/peer_train.py keeps working: one round of every contender on a tiny shape, as CI can afford.

It proves the contenders really trained (tokens/s > 0 from their own step timings) or were skipped with a reason,
and that the results file carries no path of the machine it was written on; not any speed.
"""
import json
import subprocess
import sys
from pathlib import Path

from tests.torchrun import REPO, child_env

SCRIPT = REPO / "benchmarks" / "peer_train.py"
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
# the peers issue 16 asks for, each either measured or skipped with its reason
PEERS = {"megaswift", "mcore_loop", "hf_trainer", "hf_deepspeed_zero2", "hf_deepspeed_zero3", "torchtitan"}


def test_every_peer_trains_or_says_why_not(demo_data, tmp_path):
    data_dir = Path(demo_data[0]).parent
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--overrides", json.dumps(TINY), "--seq-length", "64",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--steps", "3", "--warmup", "1", "--rounds", "1",
         "--data-dir", str(data_dir), "--results-dir", str(results)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (results / "peer_train_cpu.json").read_text()
    found = json.loads(text)

    assert found["tokens_per_step"] == 4 * 64
    summary, skipped = found["summary"], found["skipped"]
    assert set(summary) | set(skipped) == PEERS, (summary.keys(), skipped.keys())
    assert not set(summary) & set(skipped)
    assert "megaswift" in summary and "mcore_loop" in summary and "hf_trainer" in summary
    for name, row in summary.items():
        assert row["tokens_per_s"]["min"] > 0, name
        assert row["peak_memory_gib"] > 0, name
        assert found["rounds"][0][name]["steps_timed"] == 2, name  # 3 steps, 1 warm-up
    assert summary["megaswift"]["ratio_to_megaswift"]["median"] == 1.0
    for name, reason in skipped.items():
        assert isinstance(reason, str) and len(reason) > 10, name
    # results are committed: nothing in them may name this machine's folders
    assert str(tmp_path) not in text and str(REPO) not in text
