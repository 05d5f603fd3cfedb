"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions.

Model names: the base model's name and each adapter's name (requests pick an adapter by `model`).
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
from megaswift.serve.engine import BatchingEngine, GenerationRequest, GenerationResult, Sampling
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
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


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

    async def completions(self, body: CompletionRequest):
        adapter = self.adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"expected one prompt, found {len(prompts)}: send one request per prompt",
                           param="prompt")
        ids = self.renderer.tokenizer(prompts[0])["input_ids"]
        request = GenerationRequest(ids, self.max_new_tokens(len(ids), body.max_tokens, "prompt"),
                                    body.sampling(), body.stops(), adapter, body.ignore_eos)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "object": "text_completion"}
        if body.stream:
            return StreamingResponse(self._completion_stream(request, head), media_type="text/event-stream")
        result = await asyncio.wrap_future(self.engine.submit(request))
        return {**head, "usage": _usage(result), "choices": [
            {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}]}

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

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app
