"""Generation with transformers' `generate`: batches of prompts (left padding), per-row stop conditions,
streaming of each row's text as it grows, and a batching queue for a server.

One `generate` call serves a batch of requests that share sampling settings; each row keeps its own
max_new_tokens, stop strings and adapter (peft's `adapter_names`: LoRA adapters are applied per row, the
base model loaded once). A streamer (transformers' BaseStreamer protocol: `put` receives each step's new
tokens for the whole batch) decodes every row; a stopping criterion hands generate the rows that are done,
so a finished row stops costing anything but its padding.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from megaswift.serve.loading import BASE_ADAPTER, LoadedModel


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy. Requests with equal Sampling share a generate call."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    adapter: str | None = None                    # None: the base model
    ignore_eos: bool = False                      # for benchmarks: always generate max_new_tokens
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    logprobs: int | None = None                   # also score every token, with this many alternatives each


@dataclass
class TokenLogprobs:
    """Every token of prompt + completion with its log-probability given the tokens before it (None for the
    first token, which nothing predicts) and the `top` likeliest tokens at that position, likeliest first."""
    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    stop_token: int | None = None          # the end-of-turn token generation ended on (not in token_ids)
    logprobs: TokenLogprobs | None = None  # when the request asked for them

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Row:
    """One request's progress inside a batch."""
    request: GenerationRequest
    tokenizer: object
    eos_ids: frozenset
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0          # characters of text already streamed
    finish_reason: str | None = None
    stop_token: int | None = None

    def add(self, token: int) -> None:
        if self.finish_reason:
            return
        if token in self.eos_ids and not self.request.ignore_eos:
            self.finish_reason, self.stop_token = "stop", token
        else:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s, max(self.sent - len(s), 0)) for s in self.request.stop)
                       if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.ids) >= self.request.max_new_tokens:
                self.finish_reason = "length"
        self._stream()

    def _stream(self) -> None:
        """Send the text that can no longer change: not a partial UTF-8 character, not the start of a stop string."""
        if self.request.on_text is None:
            return
        end = len(self.text)
        if not self.finish_reason:
            end -= max((len(s) - 1 for s in self.request.stop), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end > self.sent:
            self.request.on_text(self.text[self.sent:end])
            self.sent = end


class _BatchStreamer:
    """transformers' streamer protocol: the first `put` is the prompt, each later one the step's tokens."""

    def __init__(self, rows: list[_Row]):
        self.rows, self.prompt_seen = rows, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            row.add(token)

    def end(self) -> None:
        for row in self.rows:
            if not row.finish_reason:
                row.finish_reason = "length"
            row._stream()


def _rows_done_criterion(rows: list[_Row]):
    import torch
    from transformers import StoppingCriteria

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([row.finish_reason is not None for row in rows], device=input_ids.device)

    return RowsDone()


class Generator:
    """Runs batches of GenerationRequests on a loaded model (one thread at a time)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        tokenizer, config = loaded.tokenizer, loaded.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = frozenset([*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                                  tokenizer.eos_token_id]) - {None}

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        if len({r.sampling for r in requests}) != 1:
            raise ValueError("one batch, one Sampling: group requests by their sampling settings first")
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        sampling = requests[0].sampling
        rows = [_Row(r, tokenizer, self.eos_ids) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        pad = tokenizer.pad_token_id
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                                 device=device)
        sample = ({"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                   "top_k": sampling.top_k or None} if sampling.temperature > 0 else {"do_sample": False})
        # eos_token_id=None: end of turn is each row's own decision (_Row.add), which ignore_eos may override
        config = GenerationConfig(max_new_tokens=max(r.max_new_tokens for r in requests), pad_token_id=pad,
                                  eos_token_id=None, **sample)
        extra = {}
        if self.loaded.adapters:
            extra["adapter_names"] = [r.adapter or BASE_ADAPTER for r in requests]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        streamer = _BatchStreamer(rows)
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                           stopping_criteria=StoppingCriteriaList([_rows_done_criterion(rows)]),
                           streamer=streamer, **extra)
        results = [GenerationResult(row.text, row.ids, row.finish_reason, len(row.request.prompt_ids), row.stop_token)
                   for row in rows]
        for request, result in zip(requests, results):
            if request.logprobs is not None:
                # the end-of-turn token was generated too: scored, as OpenAI-compatible servers do
                ids = request.prompt_ids + result.token_ids + ([result.stop_token] if result.stop_token is not None
                                                               else [])
                result.logprobs = self.token_logprobs(ids, request.adapter, request.logprobs)
        return results

    def token_logprobs(self, ids: list[int], adapter: str | None, top: int) -> TokenLogprobs:
        """Teacher-forced scores of `ids` from one forward pass: the model's own distribution at each position
        (no temperature or top-p), as lm-eval-harness and OpenAI's `logprobs` expect. One sequence at a time keeps
        the memory at one sequence's logits (length x vocabulary)."""
        import torch

        model = self.loaded.model
        device = next(model.parameters()).device
        extra = {"adapter_names": [adapter or BASE_ADAPTER]} if self.loaded.adapters else {}
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device), **extra).logits[0, :-1]
            logprobs = logits.float().log_softmax(-1)
            chosen = logprobs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
            values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1) if top else (None, None)
        tops = [None] + ([list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())] if top
                         else [[] for _ in chosen])
        return TokenLogprobs(list(ids), [None, *chosen], tops)


_STOP = object()


class BatchingEngine:
    """A queue in front of a Generator: requests arriving within `wait_ms` of each other (and those waiting
    while a batch runs) are generated together, up to `max_batch_size` rows per generate call. One worker
    thread owns the model; `submit` returns a Future of the GenerationResult."""

    def __init__(self, generator: Generator, max_batch_size: int = 16, wait_ms: float = 10.0):
        self.generator, self.max_batch_size, self.wait_s = generator, max_batch_size, wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="megaswift-generate", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def close(self) -> None:
        """Finish the batches already queued, then stop the worker."""
        self._queue.put(_STOP)
        self._worker.join()

    def _collect(self) -> tuple[list, bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._collect()
            groups: dict[Sampling, list] = {}
            for request, future in batch:
                if future.set_running_or_notify_cancel():
                    groups.setdefault(request.sampling, []).append((request, future))
            for group in groups.values():
                try:
                    results = self.generator.generate([request for request, _ in group])
                except Exception as err:  # noqa: BLE001 - handed to every waiting request
                    for _, future in group:
                        future.set_exception(err)
                    continue
                for (_, future), result in zip(group, results):
                    future.set_result(result)
