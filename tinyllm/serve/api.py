"""An OpenAI-compatible HTTP API: `tinyllm serve` (FastAPI + uvicorn).

    GET  /v1/models
    POST /v1/chat/completions    messages → reply (stream or not)
    POST /v1/completions         raw prompt → continuation (stream or not)

Request and response shapes follow OpenAI's, so its clients and third-party UIs (OpenWebUI,
FastGPT, ...) work unchanged; errors come back as OpenAI's error JSON:
    400 malformed JSON, a bad field, or a prompt longer than the context (code context_length_exceeded)
    401 an API key is configured and the request's is missing or wrong
    404 an unknown model, when several are served (with one, any model name selects it)
Generation runs in one worker thread, a request at a time, in arrival order (serve/worker.py).
A streaming client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.data.tokenizer import render_chat
from tinyllm.serve.worker import Finish, GenerationWorker, Job, ServedModel

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        """Content as text; OpenAI's list form keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (presence_penalty, user, ...) are ignored
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI clients may send null: the default
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=4)  # OpenAI: up to 4
    stream: bool | None = None
    stream_options: dict | None = None
    n: int | None = None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


def create_app(models: list[ServedModel], api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    """The API over already loaded models (the first is the default). More than `max_queue` waiting
    requests get 503 rather than an ever longer wait."""
    worker = GenerationWorker()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    async def check_key(request: Request):
        """Every route needs `Authorization: Bearer <key>` when a key is set. (A dependency, not an
        HTTP middleware: Starlette's middleware hides client disconnects from the handlers.)"""
        given = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    app = FastAPI(title="TinyLLM", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key)])
    app.state.worker, app.state.models = worker, models
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err.status, err.message, err.kind, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        if first["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first['msg']}")
        return error_response(400, f"{where or 'body'}: {first['msg']}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), code=None)

    def pick(name: str | None) -> ServedModel:
        if len(models) == 1:
            return models[0]
        for served in models:
            if served.name == name:
                return served
        raise APIError(404, f"The model `{name}` does not exist; served: {', '.join(m.name for m in models)}",
                       code="model_not_found", param="model")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": created, "owned_by": "tinyllm"}
                                           for m in models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        served = pick(name)
        return {"id": served.name, "object": "model", "created": created, "owned_by": "tinyllm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        served = pick(body.model)
        prompt_ids, dropped = await asyncio.to_thread(chat_prompt, served, body)  # tokenizing is CPU work
        return await respond(request, served, body, prompt_ids, chat=True, dropped=dropped)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = pick(body.model)
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        prompt_ids = served.tok.encode(prompt, add_special_tokens=False).ids
        if not prompt_ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        check_fits(served, len(prompt_ids))
        return await respond(request, served, body, prompt_ids, chat=False, dropped=0)

    async def respond(request: Request, served: ServedModel, body: SamplingFields, prompt_ids: list[int], chat: bool,
                      dropped: int):
        if body.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported", param="n")
        if worker.jobs.qsize() >= max_queue:
            raise APIError(503, f"the server is busy ({max_queue} requests waiting); try again shortly",
                           kind="server_error", code="server_busy")
        if isinstance(body.stop, str) and len(body.stop) > 64:
            raise APIError(400, "stop: at most 64 characters", param="stop")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None and limit != -1 and limit < 1:
            raise APIError(400, "max_tokens: must be positive, or -1 for up to the context limit", param="max_tokens")
        room = served.context - len(prompt_ids)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(served, prompt_ids, max_tokens=room if limit in (None, -1) else min(limit, room),
                  emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)),
                  temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p,
                  top_k=body.top_k, seed=body.seed, repetition_penalty=body.repetition_penalty or 1.0,
                  stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []))
        worker.submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        headers = {"x-tinyllm-dropped-turns": str(dropped)} if dropped else {}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(job, events, ident, served.name, chat, include_usage),
                                     media_type="text/event-stream", headers=headers)
        try:
            text, finish = await collect_unless_gone(events, request)
        finally:
            job.cancel()  # no-op once finished; frees the worker if the client went away
        usage = usage_of(finish)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish.reason}
            payload = {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": served.name,
                       "choices": [choice], "usage": usage, "system_fingerprint": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}
            payload = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": served.name,
                       "choices": [choice], "usage": usage}
        return JSONResponse(payload, headers=headers)

    return app


CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def without_markers(text: str) -> str:
    """Message text with the chat format's special tokens removed, so no message can forge a turn."""
    for marker in CHAT_MARKERS:
        text = text.replace(marker, "")
    return text


def check_fits(served: ServedModel, prompt_tokens: int) -> None:
    if prompt_tokens >= served.context:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens; the prompt has "
                            f"{prompt_tokens} and leaves no room for a reply", code="context_length_exceeded",
                       param="messages")


def chat_prompt(served: ServedModel, body: ChatRequest) -> tuple[list[int], int]:
    """Token ids of the rendered conversation, and how many of its oldest turns were dropped to fit.

    System messages stay; the oldest other messages go first, until the prompt leaves room for a
    reply (a quarter of the context, or max_tokens if smaller). The newest message always stays:
    if it alone is too long the request fails with context_length_exceeded.
    """
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": without_markers(m.text())}
                for m in body.messages]
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    if not rest:
        raise APIError(400, "messages: needs at least one user or assistant message", param="messages")

    def encode(turns):
        return served.tok.encode(render_chat(system + turns, add_generation_prompt=True), add_special_tokens=False).ids

    wanted = body.max_completion_tokens or body.max_tokens
    reserve = min(served.context // 4, wanted if wanted and wanted > 0 else served.context)
    room = served.context - reserve
    low, high = 0, len(rest) - 1  # the fewest oldest messages to drop: a binary search, not one by one
    if len(encode(rest)) <= room:
        high = 0
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(encode(rest[middle:])) <= room else (middle + 1, high)
    dropped = high
    ids = encode(rest[dropped:])
    check_fits(served, len(ids))
    if dropped:
        log.info("dropped the %d oldest message(s) to fit %s's %d-token context", dropped, served.name, served.context)
    return ids, dropped


async def collect_unless_gone(events: asyncio.Queue, request: Request) -> tuple[str, Finish]:
    """`collect`, abandoned (CancelledError) if the client disconnects while waiting."""
    task = asyncio.ensure_future(collect(events))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        task.cancel()


async def collect(events: asyncio.Queue) -> tuple[str, Finish]:
    pieces = []
    while True:
        kind, value = await events.get()
        if kind == "text":
            pieces.append(value)
        elif kind == "end":
            return "".join(pieces), value
        else:
            raise APIError(500, f"generation failed: {value}", kind="server_error")


def usage_of(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


async def stream_events(job: Job, events: asyncio.Queue, ident: str, model: str, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`. If the client goes
    away, Starlette cancels this generator and the job is cancelled with it."""
    created = int(time.time())

    def chunk(delta_or_text, finish_reason=None, usage=None) -> str:
        if chat:
            choices = [] if delta_or_text is None else [{"index": 0, "delta": delta_or_text, "logprobs": None,
                                                          "finish_reason": finish_reason}]
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "system_fingerprint": None, "choices": choices}
        else:
            choices = [] if delta_or_text is None else [{"index": 0, "text": delta_or_text, "logprobs": None,
                                                          "finish_reason": finish_reason}]
            payload = {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield chunk({"content": value} if chat else value)
            elif kind == "end":
                yield chunk({} if chat else "", finish_reason=value.reason)
                if include_usage:
                    yield chunk(None, usage=usage_of(value))
                break
            else:
                error = {"error": {"message": f"generation failed: {value}", "type": "server_error", "param": None,
                                   "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op once finished; stops the worker if the client left mid-stream
