"""The training loop takes its objective as a part: an objective with its own reduction (over sequences)
and metrics trains through `Trainer` exactly like `megaswift pt`, and its metrics reach metrics.jsonl."""
import json
from pathlib import Path

import pytest

from tests.train.runner import pt_flags, run_pt

OBJECTIVE_SCRIPT = str(Path(__file__).with_name("sequence_mean_objective.py"))
RUN = {"train__train_iters": 3, "data__split": "90,10,0", "train__eval_interval": 2, "train__eval_iters": 2}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_objective_reducing_over_sequences_trains_like_pt_and_logs_its_metrics(demo_data, tmp_path):
    run_pt(pt_flags(demo_data, tmp_path / "pt", **RUN))
    # exit code 3 would mean the script found CPU patches still applied after Trainer.run() returned
    run_pt(pt_flags(demo_data, tmp_path / "objective", **RUN), command=(OBJECTIVE_SCRIPT,))
    pt, objective = _records(tmp_path / "pt"), _records(tmp_path / "objective")
    steps = lambda records: {r["step"]: r for r in records if "loss" in r}
    evals = lambda records: {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(steps(objective)) == [1, 2, 3] and sorted(evals(objective)) == [2]
    # Equal gradient norms: megatron-core divided the gradients by the objective's count (sequences), not
    # by tokens (Adam alone would hide a wrong scale); equal losses at steps 2 and 3 follow from them.
    for step, record in steps(pt).items():
        assert steps(objective)[step]["loss"] == pytest.approx(record["loss"], rel=1e-5), step
        assert steps(objective)[step]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-5), step
    assert evals(objective)[2]["eval_loss"] == pytest.approx(evals(pt)[2]["eval_loss"], rel=1e-5)
    # The objective's own metrics, summed over micro-batches and ranks: global batch 4 of 32-token rows;
    # evaluation reads eval_iters micro-batches of 1 row.
    for record in steps(objective).values():
        assert record["sequences"] == 4 and record["tokens_per_sequence"] == 32
        assert {"lr", "grad_norm", "tokens_per_s"} <= set(record)
    assert evals(objective)[2]["eval_sequences"] == 2 and evals(objective)[2]["eval_tokens_per_sequence"] == 32
    assert "sequences" not in steps(pt)[1]  # pt's log line keeps its own fields
