"""Score generated text against the expected tool call: exact match of the tool name and arguments.

    prompt, expected = expected_tool_call(sample)    # messages up to the call, and the call
    text = generate(prompt, tools=sample["tools"])   # done by the trained model
    scores = score([text, ...], [expected, ...])     # name / arguments / exact-match accuracy

Two output styles are parsed: ChatML/Hermes tags (<tool_call>{"name": ..., "arguments": ...}
</tool_call>) and ReAct (Action: name / Action Input: {json}). The first call in the text counts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_REACT = re.compile(r"Action:\s*(?P<name>[^\n]+?)\s*\n\s*Action Input:\s*(?P<args>\{.*?\})\s*(?:\n|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def _arguments(value) -> dict | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def parse_tool_call(text: str) -> ToolCall | None:
    """The first tool call in generated text, or None when there is none (or it is not valid JSON)."""
    match = _TAGGED.search(text)
    if match:
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        args = _arguments(obj.get("arguments", {})) if isinstance(obj, dict) else None
        if args is None or not isinstance(obj.get("name"), str):
            return None
        return ToolCall(obj["name"], args)
    match = _REACT.search(text)
    if match:
        args = _arguments(match.group("args"))
        return ToolCall(match.group("name").strip(), args) if args is not None else None
    return None


def expected_tool_call(sample: dict) -> tuple[list[dict], ToolCall]:
    """The messages before the first assistant tool call (the prompt), and that call."""
    for index, message in enumerate(sample["messages"]):
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        if calls:
            fn = calls[0].get("function", calls[0])
            return sample["messages"][:index], ToolCall(fn["name"], _arguments(fn["arguments"]) or {})
    raise ValueError(f"expected a sample with an assistant tool call, found roles "
                     f"{[m['role'] for m in sample['messages']]}")


def score(generated: list[str], expected: list[ToolCall]) -> dict:
    """Accuracy of the tool name, of the arguments (name and arguments both right) and parse failures."""
    if len(generated) != len(expected):
        raise ValueError(f"expected as many generations as references, found {len(generated)} and {len(expected)}")
    parsed = [parse_tool_call(text) for text in generated]
    total = max(len(expected), 1)
    names = sum(p is not None and p.name == e.name for p, e in zip(parsed, expected))
    exact = sum(p is not None and p == e for p, e in zip(parsed, expected))
    return {"samples": len(expected), "name_accuracy": names / total, "exact_match": exact / total,
            "parse_failures": sum(p is None for p in parsed)}
