"""An OpenAI-compatible HTTP API: `tinyllm serve` (FastAPI + uvicorn).

    GET  /v1/models
    POST /v1/chat/completions    messages → reply (stream or not; n samples; logprobs)
    POST /v1/completions         raw prompt → continuation (the same)
    GET  /health                 liveness (no API key needed)
    GET  /metrics                Prometheus text: requests, queue, live slots, tokens, TTFT/latency

Request and response shapes follow OpenAI's, so its clients and third-party UIs (OpenWebUI,
FastGPT, ...) work unchanged; errors come back as OpenAI's error JSON:
    400 malformed JSON, a bad field, or a prompt longer than the context (code context_length_exceeded)
    401 an API key is configured and the request's is missing or wrong
    404 an unknown model, when several are served (with one, any model name selects it)
    503 the queue is full
Each model has a continuous batcher (infer/batcher.py) in an engine process of its own
(serve/engine.py): every request joins the running batch at the next step, and a client that
disconnects frees its slot at the next step. When a stream's
tokens come faster than the event loop sends them, the waiting pieces go out as one chunk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.data.tokenizer import RESERVED, SPECIAL_TOKENS, render_chat
from tinyllm.infer.batcher import Finish, InvalidRequest, Piece, QueueFull, Request, TokenLogprob
from tinyllm.infer.utf8 import token_bytes
from tinyllm.serve.engine import EngineProcess, EngineStopped
from tinyllm.serve.metrics import ServerMetrics
from tinyllm.serve.models import ServedModel

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url and other kinds of part: read past
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = ""

    def text(self) -> str:
        """Content as text; OpenAI's list form keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


UNION_BRANCH = re.compile(r"str|int|float|bool|none|list\[.*\]|dict\[.*\]")
"""How pydantic names the branch of a union in an error's location (not a field of the request)."""

MAX_N = 16
"""Most samples per request (`n`); they share the batch."""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (presence_penalty, user, ...) are ignored
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI clients may send null: the default
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)  # the upper bounds: `check_request`, one rule for every caller
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=4)  # OpenAI: up to 4
    stream: bool | None = None
    stream_options: dict | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    ignore_eos: bool | None = None  # vLLM's extension (extra_body): replies run to max_tokens, for benchmarks


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_wanted(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs


def create_app(models: list[ServedModel], api_key: str | None = None, max_queue: int = 64, slots: int = 32,
               prefill_tokens: int = 256, max_live_tokens: int | None = None, decode_steps: int | None = None,
               device: str = "cpu", dtype: str = "auto", threads: int = 0, invariant: bool = False) -> FastAPI:
    """The API over `models` (the first is the default), each with its own batcher of
    `slots` live requests holding at most `max_live_tokens` (prompt + max_tokens; default: every
    slot's context), `prefill_tokens` prompt tokens per step and `decode_steps` tokens per
    request per decode launch, and `invariant` replies that do not depend on the requests beside
    them (see `Batcher`). More than `max_queue`
    requests waiting for a slot get 503 rather than an ever longer wait. Each model runs in an
    engine process of its own on `device`, with weights in `dtype` and on a CPU `threads` torch
    threads (0: `engine_threads`'s default; `serve/engine.py`); it is
    loaded (and on a GPU compiled) here, before the first request."""
    batchers: dict[str, EngineProcess] = {}
    try:
        for m in models:
            batchers[m.name] = EngineProcess(m, device, dtype, slots=slots, max_queue=max_queue,
                                             max_live_tokens=max_live_tokens, prefill_tokens=prefill_tokens,
                                             decode_steps=decode_steps, threads=threads, invariant=invariant)
    except BaseException:
        for engine in batchers.values():
            engine.close()
        raise
    vocab_bytes = {m.name: token_bytes(m.tok) for m in models}
    metrics = ServerMetrics(batchers)
    outbox = Outbox()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for batcher in batchers.values():
            batcher.close()

    async def check_key(request: HTTPRequest):
        """Every route but /health needs `Authorization: Bearer <key>` when a key is set. (A
        dependency, not an HTTP middleware: Starlette's middleware hides client disconnects from
        the handlers.)"""
        given = request.headers.get("authorization", "")
        if api_key and request.url.path != "/health" and not secrets.compare_digest(
                given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    app = FastAPI(title="TinyLLM", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key)])
    app.state.batchers, app.state.models, app.state.metrics = batchers, models, metrics
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err.status, err.message, err.kind, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        # the deepest error names the field at fault: a list of content parts with a bad part fails
        # both union branches, and the string branch's error comes first
        first = max(err.errors(), key=lambda e: len(e["loc"]))
        where = ".".join(str(p) for p in first["loc"] if p != "body" and not UNION_BRANCH.fullmatch(str(p)))
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

    @app.get("/health")
    async def health():
        """200 while every model's engine runs; 503 naming the stopped ones (nothing restarts them)."""
        stopped = [name for name, engine in batchers.items() if engine.stopped]
        state = {"status": "engine_stopped" if stopped else "ok", "models": [m.name for m in models],
                 "queued": sum(b.queued for b in batchers.values()),
                 "live": sum(b.live_requests for b in batchers.values())}
        return JSONResponse({**state, "stopped": stopped}, status_code=503) if stopped else state

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": created, "owned_by": "tinyllm"}
                                           for m in models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        served = pick(name)
        return {"id": served.name, "object": "model", "created": created, "owned_by": "tinyllm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: HTTPRequest):
        served = pick(body.model)
        prompt_ids, dropped = await asyncio.to_thread(chat_prompt, served, body)  # tokenizing is CPU work
        return await respond(request, served, body, prompt_ids, chat=True, dropped=dropped)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        served = pick(body.model)
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        prompt_ids = served.tok.encode(prompt, add_special_tokens=False).ids
        if not prompt_ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        check_fits(served, len(prompt_ids), param="prompt")
        return await respond(request, served, body, prompt_ids, chat=False, dropped=0, prompt_chars=len(prompt))

    async def respond(http: HTTPRequest, served: ServedModel, body: SamplingFields, prompt_ids: list[int], chat: bool,
                      dropped: int, prompt_chars: int = 0):
        if isinstance(body.stop, str) and len(body.stop) > 64:
            raise APIError(400, "stop: at most 64 characters", param="stop")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None and limit != -1 and limit < 1:
            raise APIError(400, "max_tokens: must be positive, or -1 for up to the context limit", param="max_tokens")
        room = served.context - len(prompt_ids)
        logprobs = body.logprobs_wanted()
        settings = dict(max_tokens=room if limit in (None, -1) else min(limit, room),
                        temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p,
                        top_k=body.top_k, repetition_penalty=body.repetition_penalty or 1.0, logprobs=logprobs,
                        ignore_eos=bool(body.ignore_eos),
                        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []))
        events: asyncio.Queue = asyncio.Queue()
        outbox.loop = asyncio.get_running_loop()
        requests: list[Request] = []

        def emitter(index: int):
            def emit(kind: str, value) -> None:  # on the engine's event reader thread
                if kind != "text":
                    metrics.observe(served.name, requests[index], value.reason if kind == "end" else "error")
                outbox.put(events, (index, kind, value))
            return emit

        for index in range(body.n or 1):  # sample i of a seeded request = the request with seed + i
            requests.append(Request(prompt_ids, emit=emitter(index), **settings,
                                    seed=None if body.seed is None else (body.seed + index) % 2**63))
        try:
            batchers[served.name].submit(*requests)
        except InvalidRequest as err:
            param = "messages" if chat and err.param == "prompt" else err.param
            raise APIError(400, f"{param}: {err}", param=param) from None
        except QueueFull:
            raise APIError(503, f"the server is busy ({max_queue} requests waiting); try again shortly",
                           kind="server_error", code="server_busy") from None
        except EngineStopped as err:
            raise APIError(503, f"{err}; the server cannot generate (see its log)", kind="server_error",
                           code="engine_stopped") from None
        shape = ResponseShape(("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), served.name, chat,
                              vocab_bytes[served.name], prompt_chars, logprobs is not None)
        headers = {"x-tinyllm-dropped-turns": str(dropped)} if dropped else {}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(requests, events, shape, include_usage),
                                     media_type="text/event-stream", headers=headers)
        try:
            choices, usage = await collect_unless_gone(events, len(requests), shape, http)
        finally:
            for request in requests:
                request.cancel()  # no-op once finished; frees the slot if the client went away
        kind = "chat.completion" if chat else "text_completion"
        payload = {"id": shape.ident, "object": kind, "created": int(time.time()), "model": served.name,
                   "choices": choices, "usage": usage}
        if chat:
            payload["system_fingerprint"] = None
        return JSONResponse(payload, headers=headers)

    return app


MARKER_AT_END = re.compile("(?:" + "|".join([*map(re.escape, SPECIAL_TOKENS),
                                              re.escape(RESERVED).replace(re.escape("{}"), r"\d+")]) + r")\Z")
"""A special token's text ending a string: ChatML's, or a reserved one (tinyllm/data/tokenizer.py;
never trained, so kept out too)."""


def without_markers(text: str) -> str:
    """Message text with the chat format's special tokens (and the reserved ones) removed, so no
    message can forge a turn, also where removing one joins the pieces around it into another
    (`<|im_<|im_end|>end|>`): a marker is dropped as soon as the text kept so far ends with one, in
    one pass (a loop of `replace` until nothing changes took quadratic time on deeply nested input)."""
    if "<|" not in text:  # every message without a marker's start: no per-character pass
        return text
    kept: list[str] = []
    for char in text:
        kept.append(char)
        if char == ">":
            marker = MARKER_AT_END.search("".join(kept[-32:]))  # (a reserved one's index has at most 19 digits)
            if marker:
                del kept[-len(marker.group()):]
    return "".join(kept)


def check_fits(served: ServedModel, prompt_tokens: int, param: str = "messages") -> None:
    if prompt_tokens >= served.context:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens; the prompt has "
                            f"{prompt_tokens} and leaves no room for a reply", code="context_length_exceeded",
                       param=param)


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


class Outbox:
    """Events from the engines' reader threads to the responses on the event loop. One wake-up of the
    loop carries every event that came before it: a step of 32 streams is one wake-up, not 32
    (each is a write to the loop's self-pipe)."""

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def put(self, queue: asyncio.Queue, item) -> None:
        """From any thread. The item goes in before the flag is read, and `_deliver` clears the flag
        before it drains, so no item is left behind."""
        self.items.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: a later loop must still get woken
                self.scheduled = False
                raise

    def _deliver(self) -> None:
        self.scheduled = False
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


@dataclass
class ResponseShape:
    """What it takes to write a choice in OpenAI's shape."""
    ident: str
    model: str
    chat: bool
    vocab_bytes: dict[int, bytes]
    prompt_chars: int
    """Completions' logprobs count text offsets from the start of the prompt."""
    logprobs_wanted: bool

    def choice(self, index: int, text: str, pieces: list[Piece], finish_reason: str | None, offset: int,
               stream: bool) -> dict:
        """One choice (a whole message, or a stream delta) with its log-probs, if asked for."""
        logprobs = [entry for piece in pieces for entry in piece.logprobs]
        logprobs = self.logprobs(logprobs, offset) if logprobs or (self.logprobs_wanted and not stream) else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        content = {"content": text} if stream else {"role": "assistant", "content": text}
        return {"index": index, "delta" if stream else "message": content, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the legacy
        parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
        def text(token: int) -> str:
            return self.vocab_bytes.get(token, b"").decode("utf-8", errors="replace")

        if self.chat:
            return {"content": [{"token": text(e.token), "logprob": e.logprob, "bytes": list(self.vocab_bytes[e.token]),
                                 "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(self.vocab_bytes[t])}
                                                  for t, lp in e.top]} for e in entries], "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self.prompt_chars + offset)
            offset += len(text(e.token))
        return {"tokens": [text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


async def collect_unless_gone(events: asyncio.Queue, n: int, shape: ResponseShape, http: HTTPRequest
                              ) -> tuple[list[dict], dict]:
    """`collect`, abandoned (CancelledError) if the client disconnects while waiting."""
    task = asyncio.ensure_future(collect(events, n, shape))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await http.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        task.cancel()


async def collect(events: asyncio.Queue, n: int, shape: ResponseShape) -> tuple[list[dict], dict]:
    """The n choices, once every sample has ended, and the usage."""
    pieces: list[list[Piece]] = [[] for _ in range(n)]
    finishes: dict[int, Finish] = {}
    while len(finishes) < n:
        index, kind, value = await events.get()
        if kind == "text":
            pieces[index].append(value)
        elif kind == "end":
            finishes[index] = value
        else:
            raise APIError(500, f"generation failed: {value}", kind="server_error")
    choices = [shape.choice(i, "".join(p.text for p in pieces[i]), pieces[i], finishes[i].reason, 0, stream=False)
               for i in range(n)]
    return choices, usage_of(list(finishes.values()))


def usage_of(finishes: list[Finish]) -> dict:
    """One prompt, n completions."""
    prompt, completion = finishes[0].prompt_tokens, sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def stream_events(requests: list[Request], events: asyncio.Queue, shape: ResponseShape, include_usage: bool):
    """Server-sent events in OpenAI's chunk shape, ending with `data: [DONE]`. Pieces that queued up
    while the previous chunk was being sent go out together as one chunk per choice. If the client
    goes away, Starlette cancels this generator and the requests are cancelled with it."""
    created = int(time.time())
    kind = "chat.completion.chunk" if shape.chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": shape.ident, "object": kind, "created": created, "model": shape.model, "choices": choices}
        if shape.chat:
            payload["system_fingerprint"] = None
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    n, offsets, finishes = len(requests), [0] * len(requests), {}
    pending: dict[int, list[Piece]] = {}  # per choice: pieces not yet in a chunk
    out: list[str] = []  # chunks ready to send

    def flush(index: int, finish_reason: str | None = None) -> None:
        pieces = pending.pop(index, [])
        text = "".join(p.text for p in pieces)
        if pieces or finish_reason:
            out.append(chunk([shape.choice(index, text, pieces, finish_reason, offsets[index], stream=True)]))
            offsets[index] += len(text)

    try:
        if shape.chat:
            yield "".join(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(n))
        while len(finishes) < n:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            for index, what, value in batch:
                if what == "text":
                    pending.setdefault(index, []).append(value)
                elif what == "end":
                    flush(index)
                    finishes[index] = value
                    flush(index, value.reason)
                else:
                    error = {"error": {"message": f"generation failed: {value}", "type": "server_error",
                                       "param": None, "code": None}}
                    yield "".join(out) + f"data: {json.dumps(error)}\n\n" + "data: [DONE]\n\n"
                    return
            for index in list(pending):
                flush(index)
            yield "".join(out)
            out.clear()
        if include_usage:
            yield chunk([], usage=usage_of([finishes[i] for i in range(n)]))
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancel()  # no-op once finished; frees the slots if the client left mid-stream
