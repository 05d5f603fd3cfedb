"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions.

Model names: the base model's name and each adapter's name (requests pick an adapter by `model`).
/v1/completions takes OpenAI's four prompt forms (text, texts, token ids, lists of token ids) and `echo` and
`logprobs` as OpenAI defines them: what lm-eval-harness's `local-completions` model needs to score multiple
choice. /tokenizer_info, /tokenize and /detokenize are vLLM's endpoints (outside /v1, unauthenticated, as in
vLLM): lm-eval uses them to tokenize exactly as the server does.
Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}, so OpenAI clients raise their
usual exceptions: 400 for bad JSON, invalid fields and prompts longer than the context, 401 for a missing
or wrong API key, 404 for an unknown model.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from megaswift.data.sft.formats import SampleFormatError
from megaswift.serve.engine import BatchingEngine, GenerationRequest, GenerationResult, Sampling, TokenLogprobs
from megaswift.serve.rendering import ChatRenderer, prompt_from_openai
from megaswift.serve.tool_calls import StreamedContent, parse_tool_calls


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of the OpenAI API this server does not use
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not in OpenAI's API; vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Sampled):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False                          # the prompt comes back before the completion (and is scored)
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per token; 0: only the chosen token's


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(*results: GenerationResult) -> dict:
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIServer:
    """Turns API requests into GenerationRequests for one BatchingEngine."""

    def __init__(self, engine: BatchingEngine, api_key: str | None = None, default_max_tokens: int = 512):
        self.engine, self.api_key, self.default_max_tokens = engine, api_key, default_max_tokens
        self.loaded = engine.generator.loaded
        self.renderer = ChatRenderer(self.loaded.tokenizer)

    # ---- checks ------------------------------------------------------------------------------------

    def key_error(self, request: Request) -> APIError | None:
        if self.api_key is None or not request.url.path.startswith("/v1/"):
            return None
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return APIError(401, "Incorrect API key provided: give the key the server was started with "
                                 "(--api-key) as a Bearer token.", code="invalid_api_key")
        return None

    def adapter_of(self, model: str) -> str | None:
        if model == self.loaded.name:
            return None
        if model in self.loaded.adapters:
            return model
        names = [self.loaded.name, *self.loaded.adapters]
        raise APIError(404, f"The model `{model}` does not exist; this server serves {names}.", param="model",
                       code="model_not_found")

    def max_new_tokens(self, prompt_tokens: int, requested: int | None, where: str) -> int:
        context = self.loaded.context_length
        if requested is None:
            requested = min(self.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + max(requested, 1) > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, {requested} in "
                                f"the completion). Please reduce the length of the {where} or completion.",
                           param=where, code="context_length_exceeded")
        return requested

    # ---- endpoints ---------------------------------------------------------------------------------

    def models(self) -> dict:
        created = int(time.time())
        data = [{"id": self.loaded.name, "object": "model", "created": created, "owned_by": "megaswift"}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "megaswift",
                  "parent": self.loaded.name} for name in self.loaded.adapters]
        return {"object": "list", "data": data}

    async def chat(self, body: ChatCompletionRequest):
        adapter = self.adapter_of(body.model)
        try:
            prompt = prompt_from_openai(body.messages, body.tools)
        except SampleFormatError as err:
            raise APIError(400, f"{err.expected}, found {err.found}", param="messages") from None
        try:
            ids = self.renderer.prompt_ids(prompt)
        except Exception as err:  # noqa: BLE001 - the chat template's own refusal (jinja raise_exception)
            raise APIError(400, f"the model's chat template cannot render these messages: {err}",
                           param="messages") from None
        request = GenerationRequest(ids, self.max_new_tokens(len(ids), body.max_completion_tokens or body.max_tokens,
                                                             "messages"),
                                    body.sampling(), body.stops(), adapter, body.ignore_eos)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(self._chat_stream(request, head, bool(body.tools), body.stream_options),
                                     media_type="text/event-stream")
        result = await asyncio.wrap_future(self.engine.submit(request))
        parsed = parse_tool_calls(result.text) if body.tools else None
        message = {"role": "assistant", "content": result.text}
        finish = result.finish_reason
        if parsed and parsed.tool_calls:
            message = {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls}
            finish = "tool_calls"
        return {**head, "object": "chat.completion", "usage": _usage(result),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}

    async def _stream(self, request: GenerationRequest):
        """Yields text pieces as the engine produces them, then the GenerationResult."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        request.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
        future = self.engine.submit(request)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, f))
        while True:
            item = await pieces.get()
            if not isinstance(item, str):
                yield item.result()
                return
            yield item

    async def _chat_stream(self, request: GenerationRequest, head: dict, tools: bool, options: dict | None):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        yield chunk({"role": "assistant", "content": ""})
        content = StreamedContent() if tools else None
        try:
            async for item in self._stream(request):
                if isinstance(item, str):
                    text = content.feed(item) if content else item
                    if text:
                        yield chunk({"content": text})
                    continue
                finish = item.finish_reason
                if content:
                    rest, calls = content.finish(item.text)
                    if rest:
                        yield chunk({"content": rest})
                    if calls:
                        finish = "tool_calls"
                        yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                yield chunk({}, finish)
                if (options or {}).get("include_usage"):
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(item)})
        except Exception as err:  # noqa: BLE001 - the status line is sent; report in the stream as OpenAI does
            yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "param": None,
                                  "code": None}})
        yield _sse("[DONE]")

    def completion_prompts(self, prompt) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt, from any of OpenAI's four prompt forms."""
        tokenizer = self.renderer.tokenizer
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "expected at least one prompt, found an empty list", param="prompt")
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                ids = tokenizer(item, add_special_tokens=True)["input_ids"]
            else:
                ids, bad = list(item), [t for t in item if not 0 <= t < len(tokenizer)]
                if bad:
                    raise APIError(400, f"expected token ids in [0, {len(tokenizer)}), found {bad[:5]}",
                                   param="prompt")
                item = tokenizer.decode(ids)
            if not ids:
                raise APIError(400, "expected a prompt of at least one token, found an empty one", param="prompt")
            prompts.append((item, ids))
        return prompts

    async def completions(self, body: CompletionRequest):
        adapter = self.adapter_of(body.model)
        prompts = self.completion_prompts(body.prompt)
        if body.stream and (len(prompts) > 1 or body.echo or body.logprobs is not None):
            raise APIError(400, "streaming serves one prompt without echo or logprobs; send stream=false for "
                                "several prompts, echo or logprobs", param="stream")
        requests = [GenerationRequest(ids, self.max_new_tokens(len(ids), body.max_tokens, "prompt"), body.sampling(),
                                      body.stops(), adapter, body.ignore_eos, logprobs=body.logprobs)
                    for _, ids in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "object": "text_completion"}
        if body.stream:
            return StreamingResponse(self._completion_stream(requests[0], head), media_type="text/event-stream")
        # submitted together, so the engine generates them in one batch
        futures = [asyncio.wrap_future(self.engine.submit(request)) for request in requests]
        results = await asyncio.gather(*futures)
        choices = []
        for index, ((text, _), result) in enumerate(zip(prompts, results)):
            logprobs = None
            if result.logprobs is not None:
                logprobs = self.openai_logprobs(result.logprobs, 0 if body.echo else result.prompt_tokens,
                                                0 if body.echo else len(text))
            choices.append({"index": index, "text": text + result.text if body.echo else result.text,
                            "finish_reason": result.finish_reason, "logprobs": logprobs})
        return {**head, "usage": _usage(*results), "choices": choices}

    def openai_logprobs(self, scored: TokenLogprobs, first: int, offset: int) -> dict:
        """OpenAI's completions `logprobs` object for the tokens from `first` on: their text, log-probability,
        character offset (counted from the start of the prompt, as OpenAI does) and the likeliest tokens at each
        position, the chosen one included (as vLLM does) so a client can tell whether it was the top choice."""
        tokenizer = self.renderer.tokenizer
        piece = lambda token: tokenizer.decode([token])  # noqa: E731 - special tokens shown, as OpenAI does
        tokens, offsets, tops = [], [], []
        for token, logprob, top in zip(scored.token_ids[first:], scored.logprobs[first:], scored.top[first:]):
            text = piece(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if top is None:
                tops.append(None)
                continue
            best = {}
            for alternative, value in top:  # likeliest first: a text two tokens share keeps the higher value
                best.setdefault(piece(alternative), value)
            best.setdefault(text, logprob)
            tops.append(best)
        return {"tokens": tokens, "token_logprobs": scored.logprobs[first:], "top_logprobs": tops,
                "text_offset": offsets}

    def tokenizer_info(self) -> dict:
        tokenizer = self.renderer.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": self.loaded.context_length}

    def tokenize(self, body: TokenizeRequest) -> dict:
        ids = self.renderer.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": self.loaded.context_length, "tokens": ids}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        tokenizer = self.renderer.tokenizer
        if any(not 0 <= t < len(tokenizer) for t in body.tokens):
            raise APIError(400, f"expected token ids in [0, {len(tokenizer)})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    async def _completion_stream(self, request: GenerationRequest, head: dict):
        async for item in self._stream(request):
            text, finish = (item, None) if isinstance(item, str) else ("", item.finish_reason)
            yield _sse({**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})
        yield _sse("[DONE]")


def build_app(server: OpenAIServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has finished the open requests (graceful shutdown): stop the generation worker.
        await asyncio.to_thread(server.engine.close)

    app = FastAPI(title="megaswift deploy", lifespan=lifespan)

    @app.middleware("http")
    async def api_key(request: Request, call_next):  # before the body is read: a stranger learns nothing
        error = server.key_error(request)
        return error.response() if error else await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first.get('ctx', {}).get('error', '')}"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return APIError(400, message, param=where).response()

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        return await server.chat(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return server.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return server.detokenize(body)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app
