"""The generated tool-calling dataset and the tool-call scorer of examples/agent."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from megaswift.data.sft.formats import normalise_row

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "agent"


def load(name):
    spec = importlib.util.spec_from_file_location(f"agent_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_dataset, evaluate = load("make_dataset"), load("evaluate")


def test_splits_are_deterministic_by_seed_and_disjoint():
    train, held_out = make_dataset.make_splits(300, 40, seed=5)
    assert (train, held_out) == make_dataset.make_splits(300, 40, seed=5)
    assert train != make_dataset.make_splits(300, 40, seed=6)[0]
    assert len(train) == 300 and len(held_out) == 40
    train_requests = {make_dataset.request_key(s) for s in train}
    assert not train_requests & {make_dataset.request_key(s) for s in held_out}


def test_samples_normalise_and_calls_match_their_tool_schemas():
    train, _ = make_dataset.make_splits(60, 0, seed=1)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in make_dataset.TOOLS}
    used = set()
    for line, row in enumerate(train, 1):
        sample = normalise_row(json.loads(json.dumps(row)), "messages", f"train.jsonl:{line}")
        assert [m["role"] for m in sample["messages"] if m["role"] != "system"] == ["user", "assistant", "tool",
                                                                                     "assistant"]
        call = next(m for m in sample["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]
        schema = schemas[call["name"]]
        assert set(schema["required"]) <= set(call["arguments"]) <= set(schema["properties"])
        used.add(call["name"])
    assert used == set(schemas)


def test_written_files(tmp_path):
    make_dataset.main(["--out", str(tmp_path), "--train", "7", "--eval", "3", "--seed", "2"])
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and len((tmp_path / "eval.jsonl").read_text().splitlines()) == 3
    assert rows == make_dataset.make_splits(7, 3, seed=2)[0]


def test_parser_reads_tagged_and_react_calls():
    call = evaluate.ToolCall("get_weather", {"city": "Oslo"})
    assert evaluate.parse_tool_call('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                    '</tool_call>') == call
    assert evaluate.parse_tool_call('Thought: hm\nAction: get_weather\nAction Input: {"city": "Oslo"}\n') == call
    assert evaluate.parse_tool_call("It is sunny.") is None
    assert evaluate.parse_tool_call("<tool_call>{not json}</tool_call>") is None


def test_the_template_rendering_of_a_reference_call_parses_back(tokenizer):
    _, held_out = make_dataset.make_splits(0, 5, seed=3)
    for sample in held_out:
        prompt, expected = evaluate.expected_tool_call(sample)
        turn = normalise_row(sample, "messages", "eval.jsonl")["messages"][len(prompt)]
        rendered = tokenizer.apply_chat_template(prompt + [turn], tools=sample["tools"], tokenize=False)
        assert evaluate.parse_tool_call(rendered.split("<|im_start|>assistant\n")[-1]) == expected


def test_scores():
    ref = [evaluate.ToolCall("get_weather", {"city": "Oslo"})] * 4
    generated = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
                 '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>',
                 '<tool_call>{"name": "search_flights", "arguments": {"city": "Oslo"}}</tool_call>',
                 "I cannot help."]
    assert evaluate.score(generated, ref) == {"samples": 4, "name_accuracy": 0.5, "exact_match": 0.25,
                                              "parse_failures": 1}
    with pytest.raises(ValueError, match="as many generations as references"):
        evaluate.score(generated[:1], ref)
