"""Prompts rendered exactly as `megaswift sft` renders training rows.

Training (megaswift/data/sft/template.py) renders a conversation with `SFTTemplate.render`, the tokenizer's
own chat template, and tokenizes the text with `tokenizer(text, add_special_tokens=False)`. Inference
renders the conversation so far with the same call plus the generation prompt and tokenizes it the same
way, so the prompt is token for token the start of what training saw (tests/serve/test_rendering.py).

Inputs of every kind (OpenAI request messages, prompt rows in any format `megaswift sft` reads) go through
the same normalisation as training data (formats.normalise_row): tool-call arguments given as JSON
strings (as OpenAI clients send them) become dicts, ms-swift roles are renamed, and so on.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaswift.data.sft.formats import SampleFormatError, detect_format, normalise_row
from megaswift.data.sft.template import SFTTemplate

# Prompt rows may lack what training rows need: the answer. format -> (question key, answer key)
_QUESTION_ANSWER = {"swift": ("query", "response"), "alpaca": ("instruction", "output")}
_PLACEHOLDER = {"role": "assistant", "content": ""}


@dataclass
class Prompt:
    messages: list[dict]            # the standard conversation so far (formats.py), ending before the answer
    tools: list[dict] | None
    reference: str | None = None    # the row's own answer, when it has one (kept in infer's output)


def _with_answer_slot(row: dict, where: str) -> tuple[dict, str, bool]:
    """(row that normalise_row accepts, its format, whether its final assistant turn is a placeholder)."""
    if not isinstance(row, dict):
        raise SampleFormatError(where, "a JSON object (a messages / query / instruction / conversations row)",
                                repr(row)[:80])
    for fmt, field in (("messages", "messages"), ("sharegpt", "conversations")):
        turns = row.get(field)
        if field not in row:
            continue
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            role = turns[-1].get("role", turns[-1].get("from"))
            if role not in ("assistant", "gpt", "tool_call", "function_call"):
                placeholder = _PLACEHOLDER if fmt == "messages" else {"from": "gpt", "value": ""}
                return {**row, field: [*turns, placeholder]}, fmt, True
        return row, fmt, False
    for fmt, (question, answer) in _QUESTION_ANSWER.items():
        if question in row:
            return (row, fmt, False) if answer in row else ({**row, answer: ""}, fmt, True)
    return row, detect_format(row, where), False  # raises, listing the formats a row may have


def prompt_from_row(row: dict, where: str) -> Prompt:
    """A prompt from a row of any format `megaswift sft` reads; a final assistant turn becomes `reference`.
    SampleFormatError names `where` (file:line) when the row does not fit."""
    row, fmt, placeholder = _with_answer_slot(row, where)
    sample = normalise_row(row, fmt, where)
    *messages, answer = sample["messages"]
    if not messages:
        raise SampleFormatError(where, "at least one message before the answer", "an answer alone")
    return Prompt(messages, sample["tools"], None if placeholder else answer["content"])


def prompt_from_openai(messages, tools, where: str = "request") -> Prompt:
    """OpenAI chat-completion `messages` / `tools` -> the standard conversation (ValueError naming the field)."""
    return prompt_from_row({"messages": messages, "tools": tools}, where)


class ChatRenderer:
    """Renders prompts with the training template code; tokenizes them as training does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = SFTTemplate(tokenizer)  # refuses a tokenizer without chat template, as sft does

    def render(self, prompt: Prompt) -> str:
        return self.template.render(prompt.messages, prompt.tools, add_generation_prompt=True)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.token_ids(self.render(prompt))
