"""Tool calls in generated text -> OpenAI `tool_calls`, for Hermes-style templates.

The tiny tokenizer's ChatML template, Qwen2.5/Qwen3 templates and megaswift's agent data all write a call
as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; the text before the first call is the
message content. A call whose JSON does not parse (a model that is still learning) stays in the content,
so nothing the model wrote is lost.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
# The closing tag may be missing when generation stopped at the end-of-turn token right after the JSON.
_CALL = re.compile(re.escape(OPEN_TAG) + r"(.*?)(?:" + re.escape(CLOSE_TAG) + r"|\Z)", re.DOTALL)


@dataclass
class ParsedReply:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI form: arguments as a JSON string


def _openai_call(payload: dict) -> dict | None:
    name, arguments = payload.get("name"), payload.get("arguments", payload.get("parameters", {}))
    if not isinstance(name, str):
        return None
    if isinstance(arguments, str):  # some models write the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> ParsedReply:
    """Split generated text into content and tool calls; unparseable calls stay in the content."""
    if OPEN_TAG not in text:
        return ParsedReply(text)
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        kept.append(text[last:match.start()])
        last = match.end()
        try:
            call = _openai_call(json.loads(match.group(1).strip()))
        except (json.JSONDecodeError, AttributeError):
            call = None
        if call is None:
            kept.append(match.group(0))
        else:
            calls.append(call)
    kept.append(text[last:])
    return ParsedReply("".join(kept).strip() if calls else "".join(kept), calls)


class StreamedContent:
    """Streaming with tools: the text before the first `<tool_call>` streams as content as it comes; from the
    tag on, text is held back and parsed into tool_calls when the reply is complete."""

    def __init__(self):
        self.text, self.sent, self.held = "", 0, False

    def feed(self, piece: str) -> str:
        """The part of the text so far that can be streamed as content now."""
        self.text += piece
        if self.held:
            return ""
        tag = self.text.find(OPEN_TAG, max(self.sent - len(OPEN_TAG), 0))
        if tag >= 0:
            self.held = True
            end = tag
        else:  # keep back an ending that may be the start of a tag
            keep = next((k for k in range(min(len(OPEN_TAG) - 1, len(self.text)), 0, -1)
                         if self.text.endswith(OPEN_TAG[:k])), 0)
            end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out

    def finish(self, full_text: str) -> tuple[str, list[dict]]:
        """(content not streamed yet, tool calls) once the reply is complete."""
        parsed = parse_tool_calls(full_text)
        if not parsed.tool_calls:
            return full_text[self.sent:], []
        rest = _CALL.sub("", full_text[self.sent:]).strip()
        return rest, parsed.tool_calls
