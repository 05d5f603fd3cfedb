"""Encode a standard pair (formats.py) with sft's template: two sequences that share the prompt tokens.

Each side is the conversation prompt + completion encoded by `SFTTemplate.encode`, so the chat
template, `loss_on`, loss-scale rules and the input/label shift are exactly sft's (see
megaswift/data/sft/template.py): labels[i] is the target after input position i, -100 where not
trained, loss_scale[i] its weight. With the default `loss_on=last_round` the trained tokens are the
completion's assistant turns up to their end-of-turn token (TRL also trains the template's text after
it, e.g. the newline after <|im_end|>; sft does not, and neither does this).

Length: a pair is never split, so it must fit one training row as a whole:
len(chosen) + len(rejected) <= max_length tokens. An over-long pair is dropped (`drop`, counted as
too_long) or truncated (`truncate`, counted): the longer side is cut first, neither below half of
max_length unless the other side leaves room, so both keep their shared prompt start.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaswift.data.sft.template import IGNORE_INDEX, EncodedSample, SFTTemplate


@dataclass
class EncodedPair:
    chosen: EncodedSample
    rejected: EncodedSample
    prompt_tokens: int = 0      # tokens the two sequences share at their start
    drop_reason: str = ""       # "" when kept, else too_long | no_trained_tokens
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _cut(sample: EncodedSample, length: int) -> EncodedSample:
    return EncodedSample(sample.input_ids[:length], sample.labels[:length], sample.loss_scale[:length],
                         truncated=True)


def split_budget(chosen: int, rejected: int, max_length: int) -> tuple[int, int]:
    """Lengths (<= the given ones) whose sum is <= max_length: the shorter side keeps its length when it
    fits in half, the other side gets the rest."""
    half = max_length // 2
    if chosen <= half:
        return chosen, min(rejected, max_length - chosen)
    if rejected <= half:
        return min(chosen, max_length - rejected), rejected
    return half, max_length - half


class PairTemplate:
    """Standard pairs -> EncodedPair, with the settings of an SFTTemplate (its max_length is the pair's)."""

    def __init__(self, template: SFTTemplate):
        self.template = template
        self.max_length = template.max_length

    def encode(self, pair: dict) -> EncodedPair:
        tools = pair.get("tools")
        chosen, rejected = (self.template.encode({"messages": pair["prompt"] + pair[side], "tools": tools})
                            for side in ("chosen", "rejected"))
        reason = chosen.drop_reason or rejected.drop_reason
        encoded = EncodedPair(chosen, rejected, _shared_prefix(chosen.input_ids, rejected.input_ids),
                              drop_reason=reason, truncated=chosen.truncated or rejected.truncated)
        if reason or self.max_length is None or encoded.length <= self.max_length:
            return encoded
        if self.template.over_length == "drop":
            return EncodedPair(chosen, rejected, encoded.prompt_tokens, drop_reason="too_long")
        keep_chosen, keep_rejected = split_budget(len(chosen.input_ids), len(rejected.input_ids), self.max_length)
        chosen, rejected = _cut(chosen, keep_chosen), _cut(rejected, keep_rejected)
        trained = all(any(label != IGNORE_INDEX for label in side.labels) for side in (chosen, rejected))
        return EncodedPair(chosen, rejected, min(encoded.prompt_tokens, keep_chosen, keep_rejected),
                           drop_reason="" if trained else "no_trained_tokens", truncated=True)
