"""Continuous batching: one thread runs every request of a model in one shared batch.

At every step the scheduler
1. admits waiting requests into free slots of a `SlotKVCache` (a cap on live requests and on
   the tokens they may hold),
2. prefills up to `prefill_tokens` prompt tokens of the newest requests (a long prompt takes
   several steps, so the others keep decoding meanwhile),
3. decodes the next `decode_steps` tokens of every request that has its prompt in, all in one
   forward per token (on a GPU, one CUDA-graph launch for them all),
4. retires finished and cancelled requests at once, freeing their slots.
So a short request never waits for a long one, and the model runs batches instead of one
sequence at a time.

Sampling settings are per request (temperature, top-p, top-k, repetition penalty, seed) and
applied row by row in one vectorised pass. A seeded sample does not depend on its neighbours:
its random numbers come from a hash of (seed, token index, vocabulary id), not from a generator
shared by the batch. The same request therefore gives the same tokens alone or among 31 others
(up to float rounding, which can differ between batch shapes; see the tests and reports/serving.md).

    batcher = Batcher(model, tok, stop_ids={im_end}, utf8=guard)
    request = Request(prompt_ids, max_tokens=64, emit=lambda kind, value: ..., temperature=0.7)
    batcher.submit(request)   # emit("text", Piece) ..., then emit("end", Finish) or emit("error", message)
    request.cancel()          # e.g. the client hung up: its slot is freed at the next step
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinyllm import cpu_threads
from tinyllm.errors import UserError
from tinyllm.infer.generate import MIN_TEMPERATURE, inverse_cdf, keep_top_k, nucleus, penalise_repeats
from tinyllm.infer.slots import SlotKVCache
from tinyllm.infer.text import TextStream
from tinyllm.infer.utf8 import Utf8Guard

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]
    """The most likely tokens at this position with their log-probs (as many as asked for)."""


@dataclass
class Piece:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """The tokens behind this text (only when the request asked for logprobs)."""


@dataclass
class Finish:
    reason: str
    """"stop" (end of reply or a stop string), "length" (max_tokens or the context) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    """Called from the scheduler thread (in the API, from the engine's reader thread): ("text", Piece) ...,
    then ("end", Finish) or ("error", message)."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """None: no log-probs; k ≥ 0: the chosen token's log-prob and the k most likely tokens'."""
    ignore_eos: bool = False
    """Generate through end-of-reply tokens up to max_tokens (for benchmarks: equal-length replies)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] | None = None
    """Called by `cancel` (the engine process forwards the cancellation to its batcher)."""
    submitted: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel:
            self.on_cancel()

    def settings(self) -> dict:
        """What the request asks for, as plain data (to send it to another process)."""
        return {name: getattr(self, name) for name in SETTINGS}


SETTINGS = ("prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
            "logprobs", "ignore_eos")
"""The fields of a `Request` that say what to generate."""


REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""The repetition penalties a request may ask for: beyond them a logit becomes 0 or infinite in
float32, and the row's sampling breaks."""


class InvalidRequest(ValueError):
    """A request that could never run; `param` names the setting at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_request(request: Request, context: int, max_live_tokens: int) -> None:
    """InvalidRequest if the request could never run: sampling settings outside their range (they
    would break the whole batch's step, not only this row), no prompt, no room for a reply in the
    context, or more prompt + max_tokens than the live requests may hold at once."""
    low, high = REPETITION_PENALTY_RANGE
    r = request
    for name, ok, allowed in (
            ("temperature", math.isfinite(r.temperature) and r.temperature >= 0, ">= 0"),
            ("top_p", r.top_p is None or 0 < r.top_p <= 1, "in (0, 1]"),
            ("top_k", r.top_k is None or 0 <= r.top_k < 2**63, "in [0, 2**63)"),
            ("repetition_penalty", low <= r.repetition_penalty <= high, f"in [{low}, {high}]"),
            ("seed", r.seed is None or 0 <= r.seed < 2**63, "in [0, 2**63)")):
        if not ok:
            raise InvalidRequest(name, f"{name} must be {allowed}, not {getattr(r, name)!r}")
    if request.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"max_tokens must be at least 1, not {request.max_tokens}")
    if not request.prompt_ids or len(request.prompt_ids) >= context:
        raise InvalidRequest("prompt", f"a prompt needs 1 to {context - 1} tokens, not {len(request.prompt_ids)}")
    need = len(request.prompt_ids) + min(request.max_tokens, context - len(request.prompt_ids))
    if need > max_live_tokens:
        raise InvalidRequest("max_tokens", f"prompt + max_tokens is {need} tokens, more than the server holds "
                                           f"at once ({max_live_tokens}); ask for fewer max_tokens")


class QueueFull(Exception):
    pass


@dataclass
class _Live:
    """A request in a slot."""
    request: Request
    slot: int
    budget: int
    stream: TextStream
    prefilled: int = 0
    generated: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)

    @property
    def reserved(self) -> int:
        return len(self.request.prompt_ids) + self.budget


class _Launch:
    """One decode launch: the slots it ran for, its tokens (steps, slots) on their way to the host,
    and its logits (on the device; a CUDA graph's are overwritten when it replays next)."""

    def __init__(self, lives: list[_Live], tokens: torch.Tensor, logits: torch.Tensor):
        self.lives, self.tokens, self.logits = lives, tokens, logits
        self.copied = None
        if logits.device.type == "cuda":  # the copy's stream: that of the device it copies from
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(logits.device))

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


PREFILL_CHUNK = 64
"""Prompt tokens per fixed-shape prefill forward (with CUDA graphs, or a dense model's weights narrower
than fp32): on a GPU one CUDA graph covers any prompt, 64 at a time (eager prefills of ever-new
shapes took 45 ms to 1.2 s each on an H200, inside the server)."""


def capture_graph(run: Callable[[], object], device: torch.device, pool=None) -> tuple[Callable[[], object], object]:
    """`run` captured as a CUDA graph, after two runs on a side stream (compiling, warming up): a
    function that replays it and returns the outputs of the capture (overwritten by each replay),
    and the graph's memory pool, which later captures may share (`pool`)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()

    def replay():
        graph.replay()
        return out

    return replay, graph.pool()


def _buckets(most: int) -> list[int]:
    """Decode batch sizes: powers of two up to `most` (and `most` itself)."""
    sizes = [1]
    while sizes[-1] * 2 < most:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, most})


class Batcher:
    def __init__(self, model, tok, stop_ids: set[int], utf8: Utf8Guard | None = None, slots: int = 32,
                 max_live_tokens: int | None = None, prefill_tokens: int = 256, max_queue: int = 64,
                 compile: bool | None = None, decode_steps: int | None = None, prefill_chunk: int | None = None,
                 invariant: bool = False, overlap: bool | None = None, on_step: Callable[[], None] | None = None):
        """slots: most requests decoding together. max_live_tokens: most prompt + max_tokens over
        the live requests (default: every slot full). prefill_tokens: prompt tokens per step.
        max_queue: most requests waiting for a slot (more: `submit` raises QueueFull).
        compile: CUDA graphs for the decode step, one per batch-size bucket (default: a dense
        model on a GPU; an MoE routes with data-dependent shapes and runs eagerly).
        decode_steps: tokens per request that one decode launch makes (default: 8 with CUDA
        graphs, 4 otherwise). Fewer launches mean fewer host steps, copies, events and stream
        chunks per token: the limit on a GPU, and a share of the CPU's cores. A request that ends
        inside a launch drops the rest of its tokens; its slot is free at the next launch.
        prefill_chunk: prefill each prompt alone, in forwards of one fixed shape (1, prefill_chunk)
        (default: 64 with CUDA graphs, where that shape is one graph, or for a dense model with
        weights narrower than fp32; else none: a step's prompt chunks go together in one
        right-padded forward). Together, the shapes vary with the batch and so do the last bits of
        a prompt's cache: fp32 keeps that out of the tokens, bf16 does not (seeded replies parted
        on the CPU; reports/serving.md, 2026-12-05). Alone cost the 2-core CPU a fifth of its
        throughput at 32 clients (fp32 weights), which fp32 is spared.
        invariant: batch-invariant replies. Every decode launch covers all the slots (one shape
        instead of a bucket per batch size) and every prompt is prefilled alone, so the kernels a
        request's row goes through, and so its bits, never depend on how many requests run beside
        it: a greedy or seeded request gets the reply it gets alone, in bf16 on a GPU too, where
        buckets of different sizes pick different matmul kernels and a reply can part at a
        near-tie (reports/serving.md). On a GPU the scheduler also runs without cuDNN's attention,
        whose results varied from one run to the next on an H100 (torch's switch is process-wide:
        it is back as it was once the batcher is closed). Without cuDNN no masked kernel takes
        grouped heads, so its cache folds each group's query heads into rows
        (`KVCache.fold_query_groups`) rather than let SDPA copy the cache out to every query head.
        The price: idle slots are computed when few requests run. A dense model only (an
        MoE's experts take their rows from every request).
        overlap: hand out a decode launch's tokens (text, stop strings, events: the host's work)
        while the next launch runs (default: on a GPU, where launches run asynchronously). The
        next launch needs nothing from the host: each slot's last token and sampling state stay
        on the device. So a request that ends in one launch has run one launch more, whose
        tokens are dropped, and its slot is free a launch later. Not while a live request asks
        for log-probs, which are read from a launch's logits before the next one overwrites them.
        on_step: called on the scheduler thread after every step (the engine process sends a
        step's events in one message)."""
        self.model, self.tok, self.stop_ids, self.utf8 = model.eval(), tok, set(stop_ids), utf8
        cfg = model.config
        param = next(model.parameters())
        self.device = param.device
        self.context = cfg.max_seq_len
        self.slots, self.prefill_tokens, self.max_queue = slots, prefill_tokens, max_queue
        self.max_live_tokens = max_live_tokens or slots * cfg.max_seq_len
        if invariant and cfg.moe.enabled:
            raise UserError("--batch-invariant needs a dense model: an MoE's experts take their rows from every "
                            "request")
        self.invariant = invariant
        self.cache = SlotKVCache(cfg, slots, self.device, param.dtype, fold_query_groups=invariant)
        self.buckets = [slots] if invariant else _buckets(slots)
        if compile is None:
            compile = self.device.type == "cuda" and not cfg.moe.enabled
        self.compile = compile
        # not for an MoE: each expert's matmul takes the rows routed to it from every request, so its
        # bits depend on the neighbours whatever the prefill (reasoned, not measured)
        prefill_alone = invariant or compile or (torch.finfo(param.dtype).bits < 32 and not cfg.moe.enabled)
        self.prefill_chunk = prefill_chunk or (min(PREFILL_CHUNK, prefill_tokens) if prefill_alone else None)
        self._prefill_inputs = (torch.zeros(1, self.prefill_chunk or 1, dtype=torch.long, device=self.device),
                                torch.zeros(1, dtype=torch.long, device=self.device),
                                torch.zeros(1, dtype=torch.long, device=self.device))  # ids, slot, start
        self._prefill_forward: Callable[[], torch.Tensor] | None = None
        self.on_step = on_step
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Launch | None = None  # a decode launch whose tokens are not handed out yet
        self.decode_steps = decode_steps if decode_steps is not None else (8 if compile else 4)
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, not {decode_steps}")
        self._decoders: dict[int, Callable] = {}
        self._graph_pool = None  # the CUDA graphs of all buckets share one memory pool

        def zeros(dtype):
            return torch.zeros(slots, dtype=dtype, device=self.device)
        self.last = zeros(torch.long)  # each slot's newest token: its next decode input
        self.temperature, self.top_p, self.penalty = zeros(torch.float), zeros(torch.float), zeros(torch.float)
        self.top_k, self.seed, self.steps = zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.utf8_state = zeros(torch.long)
        self.seen = torch.zeros(slots, cfg.vocab_size, dtype=torch.bool, device=self.device)

        self.live: list[_Live | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.incoming: queue.Queue[Request | None] = queue.Queue()
        self.lock = threading.Lock()  # submit's queue check against the scheduler's admissions
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cancelled_requests = 0
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.thread.start()

    # --- what other threads call -------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self.incoming.qsize() + len(self.waiting)

    @property
    def live_requests(self) -> int:
        return sum(live is not None for live in self.live)

    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none: QueueFull when they would exceed max_queue)."""
        for request in requests:
            check_request(request, self.context, self.max_live_tokens)
        with self.lock:
            free = self.slots - self.live_requests  # these start at the next step rather than wait
            if self.queued + len(requests) > self.max_queue + free:
                raise QueueFull(f"{self.queued} requests waiting")
            for request in requests:
                request.submitted = time.perf_counter()
                self.incoming.put(request)

    def warm_up(self) -> None:
        """Compile every decode bucket and capture the prefill graph now, not on the first requests (a
        no-op without CUDA graphs)."""
        if self.compile:
            self.incoming.put(_WARM_UP)
            while not self._warm:
                if not self.thread.is_alive():
                    raise RuntimeError("compiling the decode steps failed (see the log above)")
                time.sleep(0.05)

    def close(self) -> None:
        """Stop the scheduler; live and waiting requests end as cancelled."""
        self.incoming.put(None)
        self.thread.join(timeout=10)

    # --- the scheduler thread ----------------------------------------------------------------

    _warm = False

    def _run(self) -> None:
        try:
            with self._attention_kernels():
                self._loop()
        except BaseException:
            log.exception("the scheduler stopped")
            raise

    def _attention_kernels(self) -> contextlib.AbstractContextManager:
        """Every attention kernel but cuDNN's, for an invariant batcher on a GPU (see `invariant`)."""
        if not (self.invariant and self.device.type == "cuda"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _loop(self) -> None:
        with torch.no_grad():
            while self._take_incoming():
                try:
                    self._step()
                except Exception as err:  # a bug must not kill the server: fail the live requests, go on
                    log.exception("batch step failed")
                    for live in [live for live in self.live if live]:
                        self._retire(live, None, error=f"{type(err).__name__}: {err}")
                if self.on_step:
                    self.on_step()

    def _take_incoming(self) -> bool:
        """Move submitted requests to the waiting line; block while there is nothing to do.
        False once `close` was called."""
        idle = not self.waiting and not any(self.live)
        while True:
            try:
                request = self.incoming.get(block=idle)
            except queue.Empty:
                return True
            if request is None:
                for live in [live for live in self.live if live]:
                    self._retire(live, "cancelled")
                for waiting in self.waiting:
                    waiting.cancel()
                self._drop_cancelled()
                return False
            if request is _WARM_UP:
                for n in self.buckets:
                    self._decoder(n)
                if self.compile and self.prefill_chunk and self._prefill_forward is None:  # no slot is live yet
                    self._prefill_forward = self._graph(self._prefill_once)
                self._warm = True
                continue
            self.waiting.append(request)
            idle = False

    def _step(self) -> None:
        if self.device.type == "cpu":
            cpu_threads.follow()
        for live in [live for live in self.live if live and live.request.cancelled.is_set()]:
            self._retire(live, "cancelled")
        self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        """End the waiting requests whose clients left, wherever they are in the line."""
        for request in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(request)
            self.cancelled_requests += 1
            request.finished_at = time.perf_counter()
            deliver(request, "end", Finish("cancelled", len(request.prompt_ids), 0))

    def _admit(self) -> None:
        self._drop_cancelled()
        reserved = sum(live.reserved for live in self.live if live)
        while self.waiting:
            request = self.waiting[0]
            budget = min(request.max_tokens, self.context - len(request.prompt_ids))
            free = [slot for slot, live in enumerate(self.live) if live is None]
            if not free or reserved + len(request.prompt_ids) + budget > self.max_live_tokens:
                return
            self.waiting.popleft()
            slot = free[0]  # the lowest free slot keeps the live rows packed at the front
            live = _Live(request, slot, budget, TextStream(self.tok, request.stop))
            self.live[slot] = live
            reserved += live.reserved
            self.prompt_tokens += len(request.prompt_ids)
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.temperature[slot] = request.temperature
            self.top_p[slot] = request.top_p if request.top_p is not None and request.top_p < 1 else 2.0  # 2: off
            self.top_k[slot] = request.top_k or 0
            self.penalty[slot] = request.repetition_penalty
            self.seed[slot], self.steps[slot], self.utf8_state[slot] = seed, 0, 0
            self.cache.positions[slot], self.cache.live[slot] = 0, False
            self.seen[slot] = False
            if request.repetition_penalty != 1.0:
                self.seen[slot, torch.tensor(request.prompt_ids, device=self.device)] = True

    def _prefill(self) -> None:
        """The next prompt chunks, oldest request first, up to prefill_tokens in all."""
        chunks, room = [], self.prefill_tokens
        for live in sorted((live for live in self.live if live and not live.decoding),
                           key=lambda live: live.request.submitted):
            take = min(len(live.request.prompt_ids) - live.prefilled, room)
            if take <= 0:
                break
            chunks.append((live, take))
            room -= take
        if not chunks:
            return
        rows = torch.tensor([live.slot for live, _ in chunks], device=self.device)
        starts = torch.tensor([live.prefilled for live, _ in chunks], device=self.device)
        ends = self._prefill_fixed(chunks) if self.prefill_chunk else self._prefill_together(chunks, rows, starts)
        for live, take in chunks:
            live.prefilled += take
        self.cache.positions[rows] = starts + torch.tensor([take for _, take in chunks], device=self.device)
        done = [row for row, (live, _) in enumerate(chunks) if live.decoding]
        if done:  # these prompts are in: their first token comes from the prefill's last position
            lives = [chunks[row][0] for row in done]
            slots = rows[done]
            logits = ends[torch.tensor(done, device=self.device)]
            options = _Options.needed_by([live.request for live in lives])
            tokens = self._pick(logits, slots, options)
            self._advance(slots, tokens, torch.ones_like(tokens, dtype=torch.bool), options)
            self.cache.live[slots] = True  # decoding from now on
            self._emit(lives, [[token] for token in tokens.tolist()], logits[None], list(range(len(lives))))

    def _prefill_together(self, chunks: list[tuple[_Live, int]], rows: torch.Tensor, starts: torch.Tensor
                          ) -> torch.Tensor:
        """All chunks in one right-padded forward: the logits at each chunk's last token (R, vocab)."""
        width = max(take for _, take in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, (live, take) in enumerate(chunks):
            ids[row, :take] = torch.tensor(live.request.prompt_ids[live.prefilled:live.prefilled + take])
        logits = self.model(ids.to(self.device), cache=self.cache.prefill(rows, starts)).logits
        last = torch.tensor([take - 1 for _, take in chunks], device=self.device)
        return logits[torch.arange(len(chunks), device=self.device), last]

    def _prefill_fixed(self, chunks: list[tuple[_Live, int]]) -> torch.Tensor:
        """Each chunk in forwards of shape (1, prefill_chunk), right-padded (on a GPU, a CUDA graph
        replayed): the logits at each chunk's last token (R, vocab)."""
        ids, slot, start = self._prefill_inputs
        ends = []
        for live, take in chunks:
            prompt = live.request.prompt_ids
            for at in range(live.prefilled, live.prefilled + take, self.prefill_chunk):
                piece = prompt[at:min(at + self.prefill_chunk, live.prefilled + take)]
                ids.zero_()
                ids[0, :len(piece)] = torch.tensor(piece)
                slot.fill_(live.slot)
                start.fill_(at)
                if self._prefill_forward is None:  # the inputs are real: warming up and capturing write correct values
                    self._prefill_forward = self._graph(self._prefill_once) if self.compile else self._prefill_once
                logits = self._prefill_forward()
            ends.append(logits[0, len(piece) - 1].clone())  # before the next replay overwrites it
        return torch.stack(ends)

    def _prefill_once(self) -> torch.Tensor:
        ids, slot, start = self._prefill_inputs
        return self.model(ids, cache=self.cache.prefill(slot, start, fixed=True)).logits

    def _decode(self) -> None:
        """Launch the next decode steps of the live slots, then hand out the tokens of the launch
        before it (`overlap`) or of this one."""
        lives = [live for live in self.live if live and live.decoding]
        earlier, self._in_flight = self._in_flight, None
        launch = None
        if lives:
            n = next(size for size in self.buckets if size > max(live.slot for live in lives))
            tokens, logits = self._decoder(n)()
            launch = _Launch(lives, tokens.to("cpu", non_blocking=True), logits)
            if self.overlap and all(live.request.logprobs is None for live in lives):
                self._in_flight, launch = launch, None
        for done in (earlier, launch):
            if done is not None:
                self._hand_out(done)

    def _hand_out(self, launch: _Launch) -> None:
        """A launch's tokens to the requests it ran for that are still in their slots (one that
        ended or was cancelled since it was launched gets none of them)."""
        launch.wait()
        steps = launch.tokens.tolist()
        lives = [live for live in launch.lives if self.live[live.slot] is live]
        self._emit(lives, [[step[live.slot] for step in steps] for live in lives], launch.logits,
                   [live.slot for live in lives])

    def _decoder(self, n: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """`decode_steps` decode steps of slots 0..n-1: each step's tokens (steps, n), the model's
        logits they were drawn from (steps, n, vocab), and the live slots' state moved on. On a GPU
        the model is compiled and all the steps (model, sampling, state) captured as one CUDA graph
        per bucket, so they cost one launch and one copy to the host (the sampling is not compiled:
        Triton failed to compile its fused integer hash and argmax). Elsewhere they run eagerly
        and skip the sampling options no live request uses."""
        if n in self._decoders:
            return self._decoders[n]
        view, rows = self.cache.decode(n), slice(0, n)

        def forward() -> torch.Tensor:
            return self.model(self.last[:n, None], cache=view).logits[:, -1]

        def step(options: _Options, forward=forward) -> tuple[torch.Tensor, torch.Tensor]:
            made = []
            for _ in range(self.decode_steps):
                logits = forward()
                tokens = self._pick(logits, rows, options)
                self._advance(rows, tokens, view.live, options)
                made.append((tokens, logits))
            return torch.stack([tokens for tokens, _ in made]), torch.stack([logits for _, logits in made])

        if not self.compile:
            self._decoders[n] = lambda: step(_Options.needed_by(
                [live.request for live in self.live[:n] if live and live.decoding]))
            return self._decoders[n]
        live = self.cache.live.clone()  # no slot is live while compiling and capturing: state stays put
        self.cache.live.zero_()
        dynamo = torch._dynamo.config  # every bucket (of every model) is one more compiled variant of `forward`
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        compiled = torch.compile(forward, fullgraph=True, dynamic=False)  # the model; sampling stays eager
        try:
            with self._compile_caches():  # compiled at the capture's first run
                self._decoders[n] = self._graph(lambda: step(_Options.ALL, compiled))
        except Exception:  # a compiler bug must not stop the server: the graph alone still pays
            log.exception("compiling the decode step failed; capturing it uncompiled")
            self._decoders[n] = self._graph(lambda: step(_Options.ALL))
        self.cache.live.copy_(live)
        return self._decoders[n]

    def _compile_caches(self) -> contextlib.AbstractContextManager:
        """Compile caches off for an invariant batcher: torch's on-disk caches do not key a graph on
        the attention kernels allowed when it was compiled (pytorch/pytorch#185449), so an
        invariant server took the default's cached graphs, cuDNN's attention in them, and parted
        from solo replies again (25-28 of 32 on an H100), and a default server started after an
        invariant one took its graphs without cuDNN (12-14k tokens/s at 32 clients where it makes
        23-25k): reports/serving.md, 2026-12-06, fourteenth session. The price: an invariant
        server compiles its decode step anew at every start, until torch keys its caches on the
        attention kernels (pytorch/pytorch#185511)."""
        if not self.invariant:
            return contextlib.nullcontext()
        return torch._inductor.config.patch(force_disable_caches=True)

    def _graph(self, run: Callable[[], object]) -> Callable[[], object]:
        """`run` captured as a CUDA graph (`capture_graph`), in the memory pool of the others."""
        replay, self._graph_pool = capture_graph(run, self.device, self._graph_pool)
        return replay

    def _pick(self, logits: torch.Tensor, rows, options: _Options) -> torch.Tensor:
        """One token per row of `logits`, each with the sampling settings of its slot (`rows`: a slice
        or an index tensor of slots). Options no row uses may be skipped; every option is the
        identity for a row that does not ask for it, so computing it anyway changes nothing."""
        if self.utf8:
            logits = logits.masked_fill(~self.utf8.allowed(self.utf8_state[rows]), float("-inf"))
        if options.penalty:
            logits = penalise_repeats(logits, self.seen[rows], self.penalty[rows, None])
        greedy = logits.argmax(-1)
        if not options.sampling:
            return greedy
        temperature = self.temperature[rows]
        scaled = logits.float() / temperature.clamp(min=MIN_TEMPERATURE)[:, None]
        if options.top_k:
            scaled = keep_top_k(scaled, self.top_k[rows])
        probs = torch.softmax(scaled, -1)
        if options.top_p:
            probs = nucleus(probs, self.top_p[rows, None])
        sampled = inverse_cdf(probs, row_uniform(self.seed[rows], self.steps[rows]))
        return torch.where(temperature > 0, sampled, greedy)

    def _advance(self, rows, tokens: torch.Tensor, live: torch.Tensor, options: _Options) -> None:
        """Move the sampling state of the `live` ones among `rows` past their new tokens. (The
        tokens seen matter only to a repetition penalty: a request that has one is live whenever
        its row is updated, and its row starts from its prompt.)"""
        self.last[rows] = torch.where(live, tokens, self.last[rows])
        self.steps[rows] += live.long()
        if options.penalty:
            self.seen[rows] = self.seen[rows].scatter(1, tokens[:, None], self.seen[rows].gather(1, tokens[:, None])
                                                      | live[:, None])
        if self.utf8:
            self.utf8_state[rows] = torch.where(live, self.utf8.advance(self.utf8_state[rows], tokens),
                                                self.utf8_state[rows])

    def _emit(self, lives: list[_Live], tokens: list[list[int]], logits: torch.Tensor, rows: list[int]) -> None:
        """Hand each live request its new tokens (`tokens[i]`: one per step; `logits[step, rows]`: the
        raw logits they came from, for log-probs). A request that ends drops its tokens after the end."""
        asked = [live.request.logprobs for live in lives if live.request.logprobs is not None]
        logprobs = ([_logprobs(logits[step, rows], torch.tensor([made[step] for made in tokens], device=logits.device),
                               max(asked)) for step in range(logits.shape[0])] if asked else None)
        now = time.perf_counter()
        for i, (live, made) in enumerate(zip(lives, tokens)):
            request = live.request
            if request.first_token_at is None:
                request.first_token_at = now
            text, end = "", None
            for step, token in enumerate(made):
                if token in self.stop_ids and not request.ignore_eos:
                    end = "stop"
                    break
                live.generated += 1
                self.generated_tokens += 1
                if logprobs is not None and request.logprobs is not None:
                    chosen, top_ids, top_values = logprobs[step]
                    k = request.logprobs
                    live.logprobs.append(TokenLogprob(token, chosen[i], list(zip(top_ids[i][:k], top_values[i][:k]))))
                text += live.stream.push(token)
                if live.stream.stopped:
                    end = "stop"
                    break
                if live.generated == live.budget:
                    end = "length"
                    break
            if text:
                deliver(request, "text", Piece(text, live.logprobs))
                live.logprobs = []
            if end:
                self._retire(live, end)

    def _retire(self, live: _Live, reason: str | None, error: str | None = None) -> None:
        request = live.request
        self.live[live.slot] = None
        self.cache.live[live.slot] = False
        request.finished_at = time.perf_counter()
        if reason == "cancelled":
            self.cancelled_requests += 1
        if error is not None:
            deliver(request, "error", error)
            return
        rest = live.stream.finish()
        if rest or live.logprobs:
            deliver(request, "text", Piece(rest, live.logprobs))
        deliver(request, "end", Finish(reason, len(request.prompt_ids), live.generated))


def deliver(request: Request, kind: str, value) -> None:
    """request.emit, and if nobody can hear it any more (the event loop is closing), cancel the
    request instead of failing the whole batch."""
    try:
        request.emit(kind, value)
    except Exception:  # noqa: BLE001
        log.warning("could not deliver a %s event; cancelling the request", kind)
        request.cancel()


@dataclass(frozen=True)
class _Options:
    """Which sampling options a step computes."""
    penalty: bool
    sampling: bool
    top_k: bool
    top_p: bool

    @staticmethod
    def needed_by(requests: list[Request]) -> _Options:
        return _Options(penalty=any(r.repetition_penalty != 1.0 for r in requests),
                        sampling=any(r.temperature > 0 for r in requests),
                        top_k=any(r.top_k for r in requests),
                        top_p=any(r.top_p is not None and r.top_p < 1 for r in requests))


_Options.ALL = _Options(True, True, True, True)

_WARM_UP = Request([], 0, lambda kind, value: None)
"""A marker in the incoming queue: compile the decode buckets."""

_MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values below 2**32; the
    constant is below 2**27, so no product overflows int64."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B,) float64 numbers in (0, 1), a function of each row's (seed, step) only: a row's random
    draw does not depend on which other rows share its batch."""
    key = _mix((seed & _MASK32) ^ _mix((seed >> 32) ^ _mix(step)))
    return (key.double() + 0.5) / 2**32


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """The model's log-probs (before sampling settings) of the chosen tokens and the k best, as lists."""
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    top = logprobs.topk(k, -1) if k else None
    return (chosen.tolist(), top.indices.tolist() if top is not None else [[]] * len(tokens),
            top.values.tolist() if top is not None else [[]] * len(tokens))
