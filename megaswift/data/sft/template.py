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

Over-long rows are found before rendering and tokenizing, which for a 50 MB row would cost minutes and
gigabytes: no token covers more characters than the longest entry of the tokenizer's vocabulary
(byte-level vocabularies store one character per byte, so this bounds bytes too), so a conversation
whose message contents hold more than char_limit = (max_length + 1) x longest entry x 2 characters
cannot fit (the factor 2 leaves room for normalizers that merge characters and templates that trim).
`drop` drops such a row at once (counted as too_long); `truncate` first cuts the contents at
char_limit characters (later messages keep their role with empty content, so which turns are trained
does not change), which leaves the first max_length + 1 tokens as they were.

Two paths give the same rows (tests/data/sft/test_sft_template_fast_path.py compares them on generated
agent/multi-round data under several real chat templates):
    exact   `encode_exact`, one row at a time: every string (the text and each prefix) from
            tokenizer.apply_chat_template, the text tokenized by tokenizer(..., return_offsets_mapping=True).
            The reference, and the path of a template the fast path is not proven for.
    fast    `encode_batch` (and `encode`), a batch of rows. Each conversation is prepared once the way
            apply_chat_template prepares it, and the text and the prefixes are rendered from it by
            chat_render.py: the same compiled template and variables as apply_chat_template, with sandbox
            shortcuts that return what the sandbox returns (see there): no re-preparation per prefix, and
            the last message's prefix is the text itself. Every prefix must be a prefix of the text, else
            (or on any rendering error) the row takes the exact path, which gives the real error or the
            right spans. All texts of a batch go through the Rust tokenizer in one call (the call
            tokenizer(...) makes when no truncation or padding is set); the token weights, the end-of-turn
            cut and the shift are computed for the whole batch at once, and the rows' lists are built from
            slices of the tokenizer's id lists, run by run of trained tokens, not element by element.
The fast path is chosen once per chat template (again if the template changes): probe conversations
(system prompt, several rounds, tools, a tool call without text, tool results, text the agent loss
scale weighs) are encoded both ways with this template's settings; any difference, a probe the fast
path would hand to the exact path, or a transformers without the functions used keeps the exact path.
Rendering each prefix is still needed (a template may render anything before a turn); what the whole
path costs next to a plain render + tokenize of the text is measured in benchmarks/sft_data.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from megaswift.data.sft import chat_render
from megaswift.data.sft.loss_scale import LossScaleConfig

IGNORE_INDEX = -100
LOSS_ON = ("last_round", "all_assistant", "all")
OVER_LENGTH = ("drop", "truncate")
CHAR_LIMIT_SAFETY = 2  # see the module docstring


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
    start if it covers none: special tokens). Byte-level offsets overlap and rule out a single reduceat,
    so this is a range-maximum query over a sparse table: table[j, i] = max(weights[i : i + 2**j]), and a
    token covering the L characters [s, last] is the max of two windows of 2**floor(log2 L) characters,
    one starting at s and one ending at last. A handful of vectorised steps per row whatever the widest
    token (special tokens such as <|im_start|> cover a dozen characters)."""
    padded = np.append(char_weights, np.float32(0))
    starts = offsets[:, 0]
    last = np.maximum(offsets[:, 1], starts + 1) - 1  # the last character each token covers
    level = np.frexp((last - starts + 1).astype(np.float64))[1] - 1  # floor(log2(characters covered))
    levels = int(level.max(initial=0))
    table = np.empty((levels + 1, padded.size), dtype=padded.dtype)
    table[0] = padded
    for j in range(1, levels + 1):
        half = 1 << (j - 1)
        table[j] = table[j - 1]
        np.maximum(table[j - 1, :-half], table[j - 1, half:], out=table[j, :-half])
    return np.maximum(table[level, starts], table[level, last - (1 << level) + 1])


def _token_any(char_weights: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """`_token_max` for weights that are all 0 or 1 (no loss-scale rules): the largest is 1 exactly where a
    token covers a character of weight 1, which a running count of those characters answers in one pass."""
    positive = np.concatenate(([0], np.cumsum(np.append(char_weights, np.float32(0)) > 0)))  # count in [0, i)
    starts = offsets[:, 0]
    stops = np.maximum(offsets[:, 1], starts + 1)
    return (positive[stops] > positive[starts]).astype(np.float32)


def _cut_contents(messages: list[dict], char_limit: int) -> list[dict]:
    """The messages with their contents cut after char_limit characters in all; every message keeps
    its place and role (so last_round still trains the same turns)."""
    cut, used = [], 0
    for message in messages:
        room = max(char_limit - used, 0)
        used += len(message["content"])
        cut.append({**message, "content": message["content"][:room]} if len(message["content"]) > room else message)
    return cut


def _flatten_encodings(encodings) -> tuple[list[list[int]], np.ndarray, np.ndarray, np.ndarray]:
    """(ids per row as lists, ids [tokens], offsets [tokens, 2], row bounds [rows + 1]) of Rust
    `tokenizers.Encoding`s, all rows end to end: the values tokenizer(..., return_offsets_mapping=True)
    returns, each read once. The id lists are kept: the rows' input_ids and labels are slices of them."""
    id_lists = [encoding.ids for encoding in encodings]
    bounds = np.cumsum([0, *map(len, id_lists)])
    total = int(bounds[-1])
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=total)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(encoding.offsets for encoding in encodings)),
                          dtype=np.int64, count=2 * total).reshape(-1, 2)
    return id_lists, ids, offsets, bounds


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of every run of True in a 1-D boolean array."""
    edges = np.diff(mask.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _rust_encode_batch_is_the_call(tokenizer) -> bool:
    """Whether tokenizer(texts, add_special_tokens=False) comes down to backend.encode_batch(texts,
    add_special_tokens=False) unchanged: the stock transformers classes, and a backend with no truncation
    or padding left set and the same special-token splitting (what tokenizer(...) would set up first)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (backend is not None and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
            and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
            and not hasattr(tokenizer, "_switch_to_input_mode")
            and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False)))


# Probe conversations for choosing the path per template: every shape the encoder meets (system prompt,
# several rounds, tools, a tool call without text, tool results, text the agent loss scale weighs).
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a word up in the dictionary.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]
_PROBE_CALL = {"type": "function", "function": {"name": "lookup", "arguments": {"word": "lattice"}}}


def _probe_samples() -> list[dict]:
    system = {"role": "system", "content": "You answer briefly and use tools when they help."}
    ask = {"role": "user", "content": "What does lattice mean?"}
    react = {"role": "assistant", "content": 'Thought: look it up.\nAction: lookup\nAction Input: {"word": "lattice"}\n'
                                             "Observation: a framework of crossed strips\nFinal Answer: a grid."}
    call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    result = {"role": "tool", "content": '{"meaning": "a framework of crossed strips"}'}
    answer = {"role": "assistant", "content": "A framework of crossed strips,\n  like a trellis."}
    again = {"role": "user", "content": "Thanks! And in one word?"}
    short = {"role": "assistant", "content": "Grid."}
    return [
        {"messages": [ask, short]},
        {"messages": [system, ask, react, again, short]},
        {"messages": [system, ask, call, result, answer, again, short], "tools": _PROBE_TOOLS},
        {"messages": [ask, call, result, answer], "tools": _PROBE_TOOLS},
    ]


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
        # special_ids as a lookup table by token id: a gather instead of np.isin's sort per turn
        self._is_special = np.zeros(max(len(tokenizer), int(self.special_ids.max(initial=-1)) + 1), dtype=bool)
        self._is_special[self.special_ids] = True
        longest_token = max(map(len, tokenizer.get_vocab()), default=1)
        self.char_limit = None if max_length is None else (max_length + 1) * longest_token * CHAR_LIMIT_SAFETY
        self._fast_by_template: dict[str, bool] = {}  # chat template (repr) -> fast path chosen

    # ---- what both paths share -----------------------------------------------------------------------

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

    def _needs_spans(self) -> bool:
        return self.loss_on != "all" or bool(self.loss_scale.rules)

    def _fit_contents(self, sample: dict) -> tuple[list[dict], list | None, EncodedSample | None]:
        """(messages, tools, None), with contents cut for `truncate`; or a too_long drop for `drop`."""
        messages, tools = sample["messages"], sample.get("tools")
        if self.char_limit is not None and sum(len(m["content"].strip()) for m in messages) > self.char_limit:
            if self.over_length == "drop":
                return messages, tools, EncodedSample(drop_reason="too_long")
            messages = _cut_contents(messages, self.char_limit)
        return messages, tools, None

    def _weigh(self, text: str, spans: list[tuple[int, int]], ids: np.ndarray, offsets: np.ndarray) -> EncodedSample:
        char_w = np.full(len(text), 1.0 if self.loss_on == "all" else 0.0, dtype=np.float32)
        for start, end in spans:
            char_w[start:end] = self.loss_scale.char_weights(text[start:end])
        token_w = _token_max(char_w, offsets)
        if self.loss_on != "all":
            self._stop_after_end_of_turn(token_w, ids, offsets, spans)
        return self._shift_and_fit(ids, token_w)

    def _weigh_batch(self, texts: list[str], spans: list[list[tuple[int, int]]], encodings) -> list[EncodedSample]:
        """`_weigh` of each row, with the per-character and per-token work done once for the whole batch: the
        rows' texts lie end to end, each followed by one character of weight 0 (the padding _token_max reads
        for a token that starts at its text's end), so every token's characters stay inside its own row."""
        id_lists, ids, offsets, bounds = _flatten_encodings(encodings)
        text_start = np.cumsum([0, *(len(text) + 1 for text in texts)])
        char_w = np.full(int(text_start[-1]), 1.0 if self.loss_on == "all" else 0.0, dtype=np.float32)
        char_w[text_start[1:] - 1] = 0.0
        for text, base, row_spans in zip(texts, text_start.tolist(), spans):
            for start, end in row_spans:  # without rules every character weighs 1.0 (as char_weights gives)
                char_w[base + start:base + end] = \
                    self.loss_scale.char_weights(text[start:end]) if self.loss_scale.rules else 1.0
        batch_offsets = offsets + np.repeat(text_start[:-1], np.diff(bounds))[:, None]
        token_w = (_token_max if self.loss_scale.rules else _token_any)(char_w, batch_offsets)
        if self.loss_on != "all":
            self._stop_after_end_of_turn_batch(token_w, ids, offsets, batch_offsets[:, 0], bounds, text_start, spans)
        return self._shift_and_fit_batch(id_lists, token_w, bounds)

    def _stop_after_end_of_turn_batch(self, token_w, ids, offsets, batch_starts, bounds, text_start, spans) -> None:
        """`_stop_after_end_of_turn` of every row at once. Each row's token range of a turn is found by
        searchsorted over its token starts; when the starts of the whole batch are sorted, the same search
        over the batch gives the same ranges (rows lie apart by their padding character); else row by row."""
        if batch_starts.size > 1 and not np.all(batch_starts[1:] >= batch_starts[:-1]):
            for row, row_spans in enumerate(spans):
                lo, hi = int(bounds[row]), int(bounds[row + 1])
                self._stop_after_end_of_turn(token_w[lo:hi], ids[lo:hi], offsets[lo:hi], row_spans)
            return
        span_bounds = np.array([(base + start, base + end) for base, row_spans in zip(text_start.tolist(), spans)
                                for start, end in row_spans], dtype=np.int64).reshape(-1, 2)
        first, stop = np.searchsorted(batch_starts, span_bounds[:, 0]), np.searchsorted(batch_starts, span_bounds[:, 1])
        by_id = ids.size == 0 or int(ids.max()) < self._is_special.size  # else np.isin (same answer)
        special = np.flatnonzero(self._is_special[ids] if by_id else np.isin(ids, self.special_ids))
        last = np.searchsorted(special, stop) - 1  # the last special token before each turn's end
        has_special = last >= 0
        has_special[has_special] = special[last[has_special]] >= first[has_special]
        # zero [last special + 1, stop) of each turn: +1 / -1 marks, a running sum > 0 inside a range
        marks = np.zeros(token_w.size + 1, dtype=np.int64)
        np.add.at(marks, special[last[has_special]] + 1, 1)
        np.add.at(marks, stop[has_special], -1)
        token_w[np.cumsum(marks[:-1]) > 0] = 0.0

    def _stop_after_end_of_turn(self, token_w, ids, offsets, spans) -> None:
        """Zero the tokens of a turn after its last special token (the end-of-turn marker)."""
        starts = offsets[:, 0]
        by_id = ids.size == 0 or int(ids.max()) < self._is_special.size  # else np.isin (same answer)
        for start, end in spans:
            first, stop = np.searchsorted(starts, start), np.searchsorted(starts, end)
            turn = ids[first:stop]
            special = np.flatnonzero(self._is_special[turn] if by_id else np.isin(turn, self.special_ids))
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

    def _shift_and_fit_batch(self, id_lists: list[list[int]], token_w: np.ndarray, bounds: np.ndarray):
        """`_shift_and_fit` of each row [lo, hi) of the batch arrays. input_ids are slices of the id lists; labels
        and (when every trained token weighs 1.0) weights are filled run by run of trained tokens, since building
        Python lists from numpy arrays element by element is what per-row work costs most."""
        trained = token_w > 0
        run_starts, run_stops = _runs(trained)
        unit_weights = bool(np.all(token_w[trained] == 1.0))
        lo_all = bounds[:-1]
        end_all = bounds[1:].copy()
        over = np.zeros(lo_all.size, dtype=bool)
        if self.max_length is not None:
            over = end_all - lo_all - 1 > self.max_length
            end_all[over] = lo_all[over] + self.max_length + 1
        first_run = np.searchsorted(run_stops, lo_all + 1, side="right")  # first run ending after the first target
        stop_run = np.searchsorted(run_starts, end_all)  # runs starting before the end
        run_starts, run_stops = run_starts.tolist(), run_stops.tolist()
        results = []
        for row, (lo, end, truncated, k0, k1) in enumerate(zip(lo_all.tolist(), end_all.tolist(), over.tolist(),
                                                              first_run.tolist(), stop_run.tolist())):
            if truncated and self.over_length == "drop":
                results.append(EncodedSample(drop_reason="too_long"))
                continue
            length = end - lo - 1  # inputs (and targets) of the row
            if length <= 0 or k0 >= k1:
                results.append(EncodedSample(drop_reason="no_trained_tokens"))
                continue
            row_ids = id_lists[row]
            labels = [IGNORE_INDEX] * length
            weights = [0.0] * length if unit_weights else token_w[lo + 1:end].tolist()
            for run in range(k0, k1):  # target j of the row is token lo + 1 + j
                start, stop = max(run_starts[run], lo + 1) - lo - 1, min(run_stops[run], end) - lo - 1
                labels[start:stop] = row_ids[start + 1:stop + 1]
                if unit_weights:
                    weights[start:stop] = [1.0] * (stop - start)
            results.append(EncodedSample(row_ids[:length], labels, weights, truncated=truncated))
        return results

    # ---- the exact path: the reference -----------------------------------------------------------------

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

    def encode_exact(self, sample: dict) -> EncodedSample:
        """One row the reference way: apply_chat_template for the text and every prefix, tokenizer(...)."""
        messages, tools, dropped = self._fit_contents(sample)
        if dropped is not None:
            return dropped
        text = self.render(messages, tools)
        spans = [self.turn_span(messages, tools, i, text) for i in self.trained_turns(messages)] \
            if self._needs_spans() else []
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return self._weigh(text, spans, ids, offsets)

    # ---- the fast path ---------------------------------------------------------------------------------

    def encode(self, sample: dict) -> EncodedSample:
        (result,) = self.encode_batch([sample])
        if isinstance(result, Exception):
            raise result
        return result

    def encode_batch(self, samples: list[dict]) -> list[EncodedSample | Exception]:
        """Encode rows together (the fast path when this template has it, else one by one the exact way).
        A row that cannot be encoded gets, in its place, the exception `encode_exact` raises for it (a
        TemplateError, or the template's own error); the caller raises it or counts the row as bad."""
        renderer = chat_render.ChatRenderer(self.tokenizer) if self.fast_path() else None
        results: list = [None] * len(samples)
        rendered = []  # (row, text, spans) waiting for the batch tokenization
        for row, sample in enumerate(samples):
            try:
                prepared = self._render_fast(sample, renderer) if renderer is not None else None
                if prepared is None:
                    results[row] = self.encode_exact(sample)
                elif isinstance(prepared, EncodedSample):
                    results[row] = prepared
                else:
                    rendered.append((row, *prepared))
            except Exception as err:  # noqa: BLE001 - the row's own error, handed back in its place
                results[row] = err
        if rendered:
            rows, texts, spans = zip(*rendered)
            for row, encoded in zip(rows, self._weigh_batch(list(texts), list(spans), self._encodings(list(texts)))):
                results[row] = encoded
        return results

    def _render_fast(self, sample: dict, renderer: chat_render.ChatRenderer):
        """A dropped EncodedSample, (text, spans), or None where the exact path must decide (a prefix that is
        not a prefix of the text, a prefix the fast renderer cannot render, an assistant message first)."""
        messages, tools, dropped = self._fit_contents(sample)
        if dropped is not None:
            return dropped
        spans, last = [], len(messages) - 1
        try:
            if not messages:  # apply_chat_template refuses an empty conversation; the exact path says how
                return None
            prefixes = renderer.prepare(messages, tools)
            text = prefixes.render(len(messages), add_generation_prompt=False)
            for index in self.trained_turns(messages) if self._needs_spans() else ():
                if index == 0:  # apply_chat_template refuses the empty prefix; the exact path says how
                    return None
                head = prefixes.render(index, add_generation_prompt=True)
                upto = text if index == last else prefixes.render(index + 1, add_generation_prompt=False)
                if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
                    return None
                spans.append((len(head), len(upto)))
        except Exception:  # noqa: BLE001 - the exact path renders the row again and raises the real error
            return None
        return text, spans

    def _encodings(self, texts: list[str]) -> list:
        """Rust `Encoding`s of the texts, tokenized as tokenizer(text, add_special_tokens=False) does."""
        if not texts:
            return []
        if _rust_encode_batch_is_the_call(self.tokenizer):
            return self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return self.tokenizer(texts, add_special_tokens=False).encodings

    def fast_path(self) -> bool:
        """Whether rows of the current chat template take the fast path; decided once per template by
        encoding the probe conversations both ways (see the module docstring)."""
        key = repr(self.tokenizer.chat_template)
        if key not in self._fast_by_template:
            self._fast_by_template[key] = chat_render.AVAILABLE and self._fast_path_matches_exact()
        return self._fast_by_template[key]

    def _fast_path_matches_exact(self) -> bool:
        compared, renderer = 0, chat_render.ChatRenderer(self.tokenizer)
        for sample in _probe_samples():
            try:
                expected = self.encode_exact(sample)
            except Exception:  # noqa: BLE001 - the template refuses this shape (e.g. tools): nothing to compare
                continue
            prepared = self._render_fast(sample, renderer)
            if prepared is None:
                return False
            if not isinstance(prepared, EncodedSample):
                text, spans = prepared
                (prepared,) = self._weigh_batch([text], [spans], self._encodings([text]))
            if prepared != expected:
                return False
            compared += 1
        return compared > 0
