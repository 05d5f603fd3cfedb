"""Preference rows -> standard pairs: one shared prompt, a chosen and a rejected completion.

The standard pair:

    {"prompt":   [messages...],            # standard messages (see megaswift/data/sft/formats.py)
     "chosen":   [messages...],            # what follows the prompt in the preferred conversation
     "rejected": [messages...],            # what follows it in the other one
     "tools":    [...] | None}

Accepted formats, detected from a dataset's first row (every row must then match it):
- `trl`:               TRL's `prompt` / `chosen` / `rejected`. Conversational (lists of messages) or
                       plain text; a plain-text prompt becomes one user turn and a plain completion one
                       assistant turn, rendered with the chat template like every other row (as ms-swift
                       does; TRL itself concatenates plain text without a template). Without `prompt`
                       (TRL's implicit prompt), the prompt is what the two conversations share.
- `rejected_messages`: OpenAI `messages` plus `rejected_messages`, the same conversation with another
                       ending; the prompt is the messages both share.
- the sft formats with `rejected_response` (ms-swift `query`/`response`, `messages`, alpaca, sharegpt):
                       the last assistant message is the chosen completion, `rejected_response` the
                       rejected one.
Both conversations are normalised by sft's `normalise_row`, so roles, tool calls and tools follow the
sft rules. A pair without a rejected answer, with chosen == rejected, or with an empty completion is
a SampleFormatError naming file and line.
"""
from __future__ import annotations

from megaswift.data.sft.formats import FORMATS as SFT_FORMATS
from megaswift.data.sft.formats import SampleFormatError, detect_format, normalise_row

PAIR_FORMATS = {"trl": ("chosen", "rejected"), "rejected_messages": ("messages", "rejected_messages")}


def detect_pair_format(row: dict, where: str) -> str:
    """`trl`, `rejected_messages`, or the sft format of a row that carries `rejected_response`."""
    for name, keys in PAIR_FORMATS.items():
        if isinstance(row, dict) and all(k in row for k in keys):
            return name
    try:
        return detect_format(row, where)
    except SampleFormatError:
        expected = " or ".join("+".join(keys) for keys in PAIR_FORMATS.values())
        found = f"keys {sorted(row)}" if isinstance(row, dict) else repr(row)[:80]
        raise SampleFormatError(where, f"a preference row with keys {expected}, or an sft row "
                                       f"({'/'.join(SFT_FORMATS)}) with rejected_response", found) from None


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _conversations(row: dict, fmt: str, where: str) -> tuple[dict, dict]:
    """The preferred and the other conversation, each normalised by sft's rules."""
    if fmt == "trl":
        prompt = _as_messages(row["prompt"], "user") if "prompt" in row else []
        tools = row.get("tools")
        return tuple(normalise_row({"messages": prompt + _as_messages(row[key], "assistant"), "tools": tools},
                                   "messages", where) for key in ("chosen", "rejected"))
    if fmt == "rejected_messages":
        chosen = normalise_row(row, "messages", where)
        rejected = normalise_row({"messages": row["rejected_messages"], "tools": row.get("tools")}, "messages", where)
        return chosen, rejected
    chosen = normalise_row(row, fmt, where)
    if chosen["rejected_response"] is None:
        raise SampleFormatError(where, "a rejected answer (`rejected_response`) in every row of a preference dataset",
                                "none; add it or pass --data.skip_bad_rows to skip such rows")
    if chosen["messages"][-1]["role"] != "assistant":
        raise SampleFormatError(where, "a conversation ending with the chosen assistant answer",
                                f"one ending with a {chosen['messages'][-1]['role']} message")
    rejected = {**chosen, "messages": chosen["messages"][:-1] + [
        {"role": "assistant", "content": chosen["rejected_response"]}]}
    return chosen, rejected


def _is_empty(messages: list[dict]) -> bool:
    return not any(m["content"].strip() or m.get("tool_calls") for m in messages)


def normalise_pair(row: dict, fmt: str, where: str) -> dict:
    """Row of format `fmt` -> the standard pair; SampleFormatError naming `where` if it does not fit."""
    if fmt in PAIR_FORMATS and not (isinstance(row, dict) and all(k in row for k in PAIR_FORMATS[fmt])):
        found = f"keys {sorted(row)}" if isinstance(row, dict) else repr(row)[:80]
        raise SampleFormatError(where, f"a {fmt}-format row with keys {list(PAIR_FORMATS[fmt])} (the format "
                                       f"detected from the dataset's first row); a rejected answer is required",
                                f"{found} (add it, or pass --data.skip_bad_rows to skip such rows)")
    chosen, rejected = _conversations(row, fmt, where)
    if chosen["messages"] == rejected["messages"]:
        raise SampleFormatError(where, "a rejected answer that differs from the chosen one", "the same answer twice")
    a, b = chosen["messages"], rejected["messages"]
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    pair = {"prompt": a[:shared], "chosen": a[shared:], "rejected": b[shared:], "tools": chosen["tools"]}
    for side in ("chosen", "rejected"):
        if not pair[side] or _is_empty(pair[side]):
            raise SampleFormatError(where, f"a non-empty {side} response", f"an empty one (prompt {len(a[:shared])} "
                                                                           f"messages, {side} {pair[side]!r})")
        if pair[side][0]["role"] != "assistant":
            raise SampleFormatError(where, f"the {side} completion to start with an assistant message after the "
                                           f"shared prompt", f"a {pair[side][0]['role']} message")
    if rejected["tools"] != chosen["tools"]:
        raise SampleFormatError(where, "the same tools for the chosen and the rejected conversation", "different ones")
    return pair
