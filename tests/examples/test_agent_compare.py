"""examples/agent/compare_loss_scale.py end to end on a few samples and steps: both runs train, export,
generate and are scored, and the agent loss scale weighs the first step's loss as it should."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "agent" / "compare_loss_scale.py"


def load_script():
    spec = importlib.util.spec_from_file_location("agent_compare_loss_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in evaluate.py look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pipeline_reports_both_runs(tmp_path):
    out = tmp_path / "agent_loss_scale.json"
    load_script().main(["--work", str(tmp_path / "work"), "--out", str(out), "--train-samples", "60",
                        "--eval-samples", "4", "--steps", "3", "--global-batch", "4", "--micro-batch", "4",
                        "--seq-length", "512", "--hidden", "64", "--max-new-tokens", "8"])
    report = json.loads(out.read_text())
    assert report["held_out_samples"] == 4 and report["settings"]["steps"] == 3
    default, agent = report["results"]["default"], report["results"]["agent"]
    for run in (default, agent):
        assert 0.0 <= run["exact_match"] <= run["name_accuracy"] <= 1.0
        assert run["samples"] == 4 and run["heldout_call_loss"] > 0
    # Same initial weights and first batch: every trained token weighs >= 1 under `agent` (no ReAct
    # observations here) and the tool-call tokens 3, so its first loss is larger; starting from random
    # weights, the unweighted loss is near ln(vocab).
    assert 5.0 < default["train_loss_first"] < 8.0
    assert agent["train_loss_first"] > 1.2 * default["train_loss_first"]
    # What each run actually trained on: the two preprocessing caches hold the token weights. The agent
    # config gives the tool call's JSON (between the <tool_call> tags) 3.0 and the other assistant tokens
    # 1.0 (no ReAct `Observation:` text here, and tool results sit in untrained user turns); default is 1.0.
    assert sorted(weights_inside_and_outside_tool_calls(tmp_path / "work"), key=lambda p: sorted(p[0])) == [
        ({1.0}, {1.0}),  # --data.loss_scale default
        ({3.0}, {1.0}),  # --data.loss_scale agent
    ]


def weights_inside_and_outside_tool_calls(work: Path) -> list[tuple[set, set]]:
    """Per cached preprocessed dataset: the weights of trained target tokens strictly between the
    <tool_call> and </tool_call> tag tokens, and of the other trained tokens."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    found = []
    for folder in sorted((work / "sft_cache").glob("sft-*")):
        ds = datasets.load_from_disk(str(folder / "dataset"))
        inside, outside, in_call = set(), set(), False
        for labels, weights in zip(ds["labels"], ds["loss_scale"]):
            for token, weight in zip(labels, weights):
                in_call = in_call and token != close_id
                if token != -100:
                    (inside if in_call else outside).add(weight)
                in_call = in_call or token == open_id
        found.append((inside, outside))
    return found
