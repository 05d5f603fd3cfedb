"""Render a standard conversation with the tokenizer's own chat template; compute labels and weights.

Which tokens are trained comes from token boundaries, never from searching the output for strings:
the conversation is rendered once in full and once per boundary (the prefix up to an assistant
turn with the generation prompt, and the prefix including that turn). The lengths of those
prefixes are the character span of the turn; the tokenizer's offsets map spans onto tokens. A
template whose prefixes are not prefixes of the full rendering is refused with a clear error.

Output convention (what megatron-core's GPTModel expects): `input_ids`, `labels` and `loss_scale`
have the same length, and labels[i] is the token to predict AFTER input position i, i.e. the
rendered tokens t are split as input_ids = t[:-1], labels = t[1:]. labels[i] = -100 where the
target is not trained; loss_scale[i] is the weight of that target (0 exactly where labels is -100).

loss_on:
    last_round      assistant turns after the last user turn (the final answer and, in agent data,
                    the tool calls leading to it)
    all_assistant   every assistant turn
    all             every token of the conversation (assistant turns still get loss-scale rules)
An assistant turn is trained up to and including its last special token (the end-of-turn marker,
e.g. <|im_end|>); whatever the template puts after it (a newline) is not a target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megaswift.data.sft.loss_scale import LossScaleConfig

IGNORE_INDEX = -100
LOSS_ON = ("last_round", "all_assistant", "all")
OVER_LENGTH = ("drop", "truncate")


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to locate turns."""


@dataclass
class EncodedSample:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    loss_scale: list[float] = field(default_factory=list)
    drop_reason: str = ""  # "" when kept, else why the sample was dropped
    truncated: bool = False


def _token_max(char_weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per token, the largest weight among the characters [start, end) it covers (the character at its
    start if it covers none: special tokens). Vectorised over tokens, looping over the longest token's
    width (a few characters), since byte-level offsets overlap and rule out a single reduceat."""
    padded = np.append(char_weights, np.float32(0))
    starts = offsets[:, 0]
    last = np.maximum(offsets[:, 1], starts + 1) - 1  # the last character each token covers
    result = padded[starts]
    for step in range(1, int((last - starts).max(initial=0)) + 1):
        np.maximum(result, padded[np.minimum(starts + step, last)], out=result)
    return result


class SFTTemplate:
    """Turns standard conversations (see formats.py) into input_ids / labels / loss_scale."""

    def __init__(self, tokenizer, loss_on: str = "last_round", max_length: int | None = None,
                 over_length: str = "drop", loss_scale: LossScaleConfig | None = None):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on: expected one of {LOSS_ON}, found {loss_on!r}")
        if over_length not in OVER_LENGTH:
            raise ValueError(f"over_length: expected one of {OVER_LENGTH}, found {over_length!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
                                f"expected a tokenizer_config.json / chat_template.jinja that defines one")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("expected a fast (Rust) tokenizer: offsets mapping is needed to place the "
                                "loss mask and the loss-scale weights on tokens")
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.max_length = max_length
        self.over_length = over_length
        self.loss_scale = loss_scale or LossScaleConfig("default")
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def trained_turns(self, messages: list[dict]) -> list[int]:
        """Indices of the assistant messages whose tokens are trained (for `all`: every assistant turn)."""
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.loss_on != "last_round":
            return assistant
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        return [i for i in assistant if i > last_user]

    def turn_span(self, messages: list[dict], tools, index: int, text: str) -> tuple[int, int]:
        """Character span [start, end) of assistant turn `index` inside the full rendering `text`."""
        head = self.render(messages[:index], tools, add_generation_prompt=True)
        upto = self.render(messages[:index + 1], tools)
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise TemplateError(
                f"the chat template of {self.tokenizer.name_or_path!r} renders message {index} differently "
                f"depending on what follows it, so its tokens cannot be located: expected the rendering of "
                f"messages[:{index}] (+generation prompt) and of messages[:{index + 1}] to be prefixes of the "
                f"full conversation. Use a template that renders earlier turns the same way.")
        return len(head), len(upto)

    def encode(self, sample: dict) -> EncodedSample:
        messages, tools = sample["messages"], sample.get("tools")
        text = self.render(messages, tools)
        turns = self.trained_turns(messages)
        has_rules = bool(self.loss_scale.rules)
        spans = [self.turn_span(messages, tools, i, text) for i in turns] \
            if (self.loss_on != "all" or has_rules) else []

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        char_w = np.full(len(text), 1.0 if self.loss_on == "all" else 0.0, dtype=np.float32)
        for start, end in spans:
            char_w[start:end] = self.loss_scale.char_weights(text[start:end])
        token_w = _token_max(char_w, offsets)
        if self.loss_on != "all":
            self._stop_after_end_of_turn(token_w, ids, offsets, spans)
        return self._shift_and_fit(ids, token_w)

    def _stop_after_end_of_turn(self, token_w, ids, offsets, spans) -> None:
        """Zero the tokens of a turn after its last special token (the end-of-turn marker)."""
        starts = offsets[:, 0]
        for start, end in spans:
            first, stop = np.searchsorted(starts, start), np.searchsorted(starts, end)
            special = np.flatnonzero(np.isin(ids[first:stop], self.special_ids))
            if special.size:
                token_w[first + special[-1] + 1:stop] = 0.0

    def _shift_and_fit(self, ids: np.ndarray, token_w: np.ndarray) -> EncodedSample:
        truncated = False
        if self.max_length is not None and len(ids) - 1 > self.max_length:
            if self.over_length == "drop":
                return EncodedSample(drop_reason="too_long")
            ids, token_w, truncated = ids[:self.max_length + 1], token_w[:self.max_length + 1], True
        weights = token_w[1:]
        if not np.any(weights > 0):
            return EncodedSample(drop_reason="no_trained_tokens")
        labels = np.where(weights > 0, ids[1:], IGNORE_INDEX)
        return EncodedSample(ids[:-1].tolist(), labels.tolist(), weights.tolist(), truncated=truncated)
