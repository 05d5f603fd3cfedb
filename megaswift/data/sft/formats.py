"""Detect a dataset's row format and normalise every row to the one standard conversation.

The standard (what templates consume):

    {"messages": [{"role": "system" | "user" | "assistant" | "tool",
                   "content": str,
                   "tool_calls": [{"type": "function",
                                   "function": {"name": str, "arguments": dict}}]}],  # assistant only
     "tools": [{"type": "function", "function": {...JSON schema...}}] | None,
     "rejected_response": str | None}

A system message may only come first, an assistant message may not (a chat template has no prompt
to place it after); at least one assistant message is required. Unusual but renderable role orders
(two user turns in a row, a tool result with no assistant turn before it, ...) are kept and reported
by `role_order_warnings`, counted per dataset in the preprocessing stats. Tool-call
arguments are dicts (HF chat templates render them with `tojson`), so JSON-string arguments are
parsed here.

Accepted input formats, detected from a dataset's first row (every row must then match it):
- `messages`:  OpenAI chat (`messages`, `tools`, assistant `tool_calls`), also ms-swift's
               `tool_call` / `tool_response` roles.
- `swift`:     ms-swift's `system`, `query`, `response`, `history` ([[query, response], ...]),
               `tools`, `rejected_response`.
- `alpaca`:    `instruction`, `input` (appended after a blank line), `output`, optional `system`.
- `sharegpt`:  `conversations` of {"from": human|gpt|system|observation|function_call, "value"}.

List-valued fields may also be JSON strings (as CSV cells are).
"""
from __future__ import annotations

import json
from collections.abc import Callable

STANDARD_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"tool_response": "tool", "observation": "tool", "function": "tool",
                "human": "user", "gpt": "assistant"}


class SampleFormatError(ValueError):
    """A row that does not match its dataset's format; names the file, the line, expected and found."""

    def __init__(self, where: str, expected: str, found: str):
        self.where, self.expected, self.found = where, expected, found
        super().__init__(f"{where}: expected {expected}, found {found}")

    def __reduce__(self):  # so the error crosses process boundaries (datasets.map with num_proc) intact
        return type(self), (self.where, self.expected, self.found)


class _Mismatch(Exception):
    """Raised by the normalisers with (expected, found); normalise_row adds where."""


def location(origin: str, line: int) -> str:
    """How an error names a row: `file.jsonl:12` for text files, `file.parquet row 12` otherwise."""
    text_file = origin.endswith((".jsonl", ".json", ".csv"))
    return f"{origin}:{line}" if text_file else f"{origin} row {line}"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _maybe_json(value, what: str):
    """List/dict fields stored as JSON text (CSV cells, ms-swift `tools`) are decoded."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise _Mismatch(f"`{what}` as JSON text", f"invalid JSON ({err.msg}): {_short(value)}") from None
    return value


def _text(value, what: str, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(p.get("text", "") for p in value)  # OpenAI content parts, text only
    raise _Mismatch(f"`{what}` to be a string", _short(value))


def _tool_call(call, what: str) -> dict:
    call = _maybe_json(call, what)
    if not isinstance(call, dict):
        raise _Mismatch(f"`{what}` to be an object with name and arguments", _short(call))
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _Mismatch(f"`{what}` to have a string `name`", _short(call))
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise _Mismatch(f"`{what}.arguments` to be JSON", f"invalid JSON ({err.msg}): {_short(args)}") from None
    if not isinstance(args, dict):
        raise _Mismatch(f"`{what}.arguments` to be a JSON object", _short(args))
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


def _tools(value) -> list[dict] | None:
    value = _maybe_json(value, "tools")
    if value in (None, "", []):
        return None
    if not isinstance(value, list):
        raise _Mismatch("`tools` to be a list of function schemas", _short(value))
    tools = []
    for i, tool in enumerate(value):
        tool = _maybe_json(tool, f"tools[{i}]")
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _Mismatch(f"`tools[{i}]` to be a function schema with a string `name`", _short(tool))
        tools.append({"type": "function", "function": fn})
    return tools


def _append_tool_call(messages: list[dict], call: dict) -> None:
    """A separate tool-call turn joins the assistant turn just before it (or starts one)."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _from_messages(row: dict) -> dict:
    raw = _maybe_json(row.get("messages"), "messages")
    if not isinstance(raw, list) or not raw:
        raise _Mismatch("`messages` to be a non-empty list", _short(raw))
    messages: list[dict] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _Mismatch(f"`messages[{i}]` to be an object with role and content", _short(msg))
        role = ROLE_ALIASES.get(msg.get("role"), msg.get("role"))
        if role == "tool_call":
            _append_tool_call(messages, _tool_call(msg.get("content"), f"messages[{i}].content"))
            continue
        if role not in STANDARD_ROLES:
            raise _Mismatch(f"`messages[{i}].role` in {STANDARD_ROLES + ('tool_call',)}", _short(msg.get("role")))
        calls = msg.get("tool_calls") if role == "assistant" else None
        out = {"role": role, "content": _text(msg.get("content"), f"messages[{i}].content", allow_none=bool(calls))}
        if calls:
            if not isinstance(calls, list):
                raise _Mismatch(f"`messages[{i}].tool_calls` to be a list", _short(calls))
            out["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{k}]") for k, c in enumerate(calls)]
        messages.append(out)
    return {"messages": messages, "tools": _tools(row.get("tools")),
            "rejected_response": _optional_text(row, "rejected_response")}


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    return None if value in (None, "") else _text(value, key)


def _from_swift(row: dict) -> dict:
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    history = _maybe_json(row.get("history"), "history") or []
    if not isinstance(history, list):
        raise _Mismatch("`history` to be a list of [query, response] pairs", _short(history))
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _Mismatch(f"`history[{i}]` to be a [query, response] pair", _short(pair))
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": _text(row.get("query"), "query")})
    messages.append({"role": "assistant", "content": _text(row.get("response"), "response")})
    return {"messages": messages, "tools": _tools(row.get("tools")),
            "rejected_response": _optional_text(row, "rejected_response")}


def _from_alpaca(row: dict) -> dict:
    prompt = _text(row.get("instruction"), "instruction")
    extra = _text(row.get("input"), "input", allow_none=True)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else []
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(row.get("output"), "output")}]
    return {"messages": messages, "tools": _tools(row.get("tools")),
            "rejected_response": _optional_text(row, "rejected_response")}


def _from_sharegpt(row: dict) -> dict:
    turns = _maybe_json(row.get("conversations"), "conversations")
    if not isinstance(turns, list) or not turns:
        raise _Mismatch("`conversations` to be a non-empty list", _short(turns))
    messages = [{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise _Mismatch(f"`conversations[{i}]` to be an object with from and value", _short(turn))
        role = ROLE_ALIASES.get(turn["from"], turn["from"])
        if role == "function_call":
            _append_tool_call(messages, _tool_call(turn.get("value"), f"conversations[{i}].value"))
        elif role in STANDARD_ROLES:
            messages.append({"role": role, "content": _text(turn.get("value"), f"conversations[{i}].value")})
        else:
            raise _Mismatch(f"`conversations[{i}].from` in human/gpt/system/observation/function_call",
                             _short(turn["from"]))
    return {"messages": messages, "tools": _tools(row.get("tools")),
            "rejected_response": _optional_text(row, "rejected_response")}


# name -> (keys that identify it, normaliser); the first match wins, so keep specific ones first.
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict], dict]]] = {
    "messages": (("messages",), _from_messages),
    "sharegpt": (("conversations",), _from_sharegpt),
    "swift": (("query", "response"), _from_swift),
    "alpaca": (("instruction", "output"), _from_alpaca),
}


def detect_format(row: dict, where: str) -> str:
    """The format whose identifying keys the row has; SampleFormatError when none fits."""
    for name, (keys, _) in FORMATS.items():
        if isinstance(row, dict) and all(k in row for k in keys):
            return name
    expected = " or ".join("+".join(keys) for keys, _ in FORMATS.values())
    found = f"keys {sorted(row)}" if isinstance(row, dict) else _short(row)
    raise SampleFormatError(where, f"a row with keys {expected}", found)


def check_standard(sample: dict) -> None:
    """Rules every normalised conversation obeys."""
    messages = sample["messages"]
    for i, msg in enumerate(messages):
        if msg["role"] == "system" and i != 0:
            raise _Mismatch("a system message only as the first message", f"one at position {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Mismatch("at least one assistant message", f"roles {[m['role'] for m in messages]}")
    if messages[0]["role"] == "assistant":
        raise _Mismatch("a user (or system) message before the first assistant message",
                        f"roles {_short([m['role'] for m in messages])} (the conversation starts with the assistant)")


def role_order_warnings(messages: list[dict]) -> list[str]:
    """Role orders a chat template renders but that rarely mean what the data's author intended
    (usually a merge or export bug): two user or assistant turns in a row, a tool result with no
    assistant turn before it, a conversation that ends on a user turn (nothing after it is trained)."""
    found = []
    roles = [m["role"] for m in messages if m["role"] != "system"]
    for before, role in zip(roles, roles[1:]):
        if role == before and role in ("user", "assistant"):
            found.append(f"two {role} turns in a row")
        elif role == "tool" and before not in ("assistant", "tool"):
            found.append(f"a tool result after a {before} turn")
    if roles and roles[0] == "tool":
        found.append("a tool result first")
    if roles and roles[-1] == "user":
        found.append("a conversation ending with a user turn")
    return list(dict.fromkeys(found))  # each kind once per row


def normalise_row(row: dict, format_name: str, where: str) -> dict:
    """Row of `format_name` -> the standard conversation; SampleFormatError naming `where` if it does not fit."""
    keys, normalise = FORMATS[format_name]
    if not isinstance(row, dict) or not all(k in row for k in keys):
        found = f"keys {sorted(row)}" if isinstance(row, dict) else _short(row)
        raise SampleFormatError(where, f"a {format_name}-format row with keys {list(keys)} "
                                       f"(the format detected from the dataset's first row)", found)
    try:
        sample = normalise(row)
        check_standard(sample)
    except _Mismatch as err:
        raise SampleFormatError(where, *err.args) from None
    return sample
