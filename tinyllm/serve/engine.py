"""Each served model's batcher runs in a process of its own.

A Python process has one interpreter lock. When the event loop that writes every stream's JSON
chunks and the scheduler that feeds the GPU share a process, they take turns with it: every torch
call of the scheduler lets the lock go (an eager prefill makes hundreds), and getting it back can
mean waiting for the event loop's turn. On an H200 that held 32 streaming clients to about 7,000
tokens/s while the scheduler alone made 24,000 (reports/serving.md). So the API process keeps the
HTTP work, and a spawned engine process keeps the model:

    engine = EngineProcess(served, device="cuda", slots=32)   # loads and compiles, then returns
    engine.submit(request)        # request.emit gets ("text", Piece) ..., ("end", Finish) as before
    request.cancel()              # forwarded: the slot is free at the engine's next step
    engine.close()

Requests go to the engine one message per `submit`, and each step's events come back as one
message, with the batcher's counters.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass

from tinyllm import cpu_threads
from tinyllm.errors import UserError
from tinyllm.infer.batcher import Batcher, QueueFull, Request, check_request, deliver
from tinyllm.serve.models import ServedModel

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine process is gone (it crashed, or the server is shutting down)."""


@dataclass(frozen=True)
class Counters:
    """The batcher's counters as of its last step."""
    queued: int = 0
    live: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cancelled_requests: int = 0


def engine_threads(requested: int = 0) -> int:
    """Torch threads of an engine on a CPU: `requested`, or for 0 half of this machine's cores (at
    least one). The engine shares the CPU with the API process, which streams every token as JSON,
    and often with the clients. On the 2-core VM one thread instead of two made 8 streaming clients
    1.5x faster, and one client no slower (reports/serving.md): a decode step of a small model is
    too short to gain from a second thread that the HTTP side needed."""
    if requested:
        return requested
    return max(1, (os.cpu_count() or 1) // 2)


class EngineProcess:
    def __init__(self, served: ServedModel, device: str = "cpu", dtype: str = "auto", slots: int = 32,
                 max_queue: int = 64, max_live_tokens: int | None = None, start_timeout: float = 900,
                 threads: int = 0, **batching):
        """Start the engine and wait until its model is loaded (and on a GPU, compiled). `threads`:
        torch threads on a CPU (`engine_threads`). `batching`: the other `Batcher` settings
        (prefill_tokens, decode_steps, invariant). At most `slots` + `max_queue` requests are in the
        engine at once; more raise QueueFull."""
        self.name, self.slots, self.max_queue, self.context = served.name, slots, max_queue, served.context
        self.max_live_tokens = max_live_tokens or slots * served.context
        self.counters = Counters()
        self.inflight: dict[int, Request] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()  # the pipe's sending end and `inflight`
        self.stopped: str | None = None
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.conn, child = spawn.Pipe()
        settings = dict(slots=slots, max_queue=max_queue + slots, max_live_tokens=self.max_live_tokens, **batching)
        self.process = spawn.Process(target=_engine_main, args=(child, served, device, dtype, threads, settings),
                                     name=f"tinyllm-engine-{served.name}")
        self.process.start()
        child.close()
        # an engine nobody closed must not keep the interpreter from exiting (multiprocessing joins it)
        weakref.finalize(self, _stop_process, self.conn, self.process)
        try:
            if not self.conn.poll(start_timeout):
                raise UserError(f"{served.description}: the model did not load in {start_timeout:.0f} s")
            kind, detail = self.conn.recv()
        except EOFError:
            kind, detail = "failed", "its process stopped (see the log above)"
        except BaseException:
            _stop_process(self.conn, self.process)
            raise
        if kind != "ready":
            _stop_process(self.conn, self.process)
            raise UserError(detail)
        self.decode_sizes: list[int] = detail
        """The batch sizes the engine decodes at (one with `invariant`)."""
        self.reader = threading.Thread(target=self._read, name=f"engine-events-{served.name}", daemon=True)
        self.reader.start()

    @property
    def queued(self) -> int:
        return self.counters.queued

    @property
    def live_requests(self) -> int:
        return self.counters.live

    @property
    def generated_tokens(self) -> int:
        return self.counters.generated_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.counters.prompt_tokens

    @property
    def cancelled_requests(self) -> int:
        return self.counters.cancelled_requests

    def submit(self, *requests: Request) -> None:
        """Send requests to the engine (all or none: InvalidRequest if one could never run, QueueFull
        if they would be more than slots + max_queue in the engine)."""
        for request in requests:
            check_request(request, self.context, self.max_live_tokens)
        with self.lock:
            if self.stopped:
                raise EngineStopped(self.stopped)
            if len(self.inflight) + len(requests) > self.slots + self.max_queue:
                raise QueueFull(f"{max(0, len(self.inflight) - self.slots)} requests waiting")
            sent = []
            for request in requests:
                ident = next(self.ids)
                request.submitted = time.perf_counter()
                request.on_cancel = lambda ident=ident: self._cancel(ident)
                self.inflight[ident] = request
                sent.append((ident, request.settings()))
            try:
                self.conn.send(("submit", sent))
            except OSError:  # the engine died; the reader ends these requests
                raise EngineStopped(f"the engine of {self.name} stopped") from None

    def _cancel(self, ident: int) -> None:
        with self.lock:
            if ident in self.inflight and not self.stopped:
                try:
                    self.conn.send(("cancel", ident))
                except OSError:
                    pass  # the engine died; the reader ends the request

    def _read(self) -> None:
        """Hand the engine's events to their requests, until the engine stops; then end the
        requests still in it with an error."""
        try:
            while True:
                try:
                    _, events, counters = self.conn.recv()
                except (EOFError, OSError):
                    break
                self.counters = Counters(*counters)
                for ident, kind, value, timings in events:
                    with self.lock:
                        request = self.inflight.get(ident) if kind == "text" else self.inflight.pop(ident, None)
                    if request is None:
                        continue
                    if timings:  # seconds from arrival at the engine to the first token and to the end
                        first, end = timings
                        request.first_token_at = None if first is None else request.submitted + first
                        request.finished_at = request.submitted + end
                    deliver(request, kind, value)
        finally:
            self._end_orphans()

    def _end_orphans(self) -> None:
        with self.lock:
            self.stopped = self.stopped or f"the engine of {self.name} stopped"
            orphans, self.inflight = list(self.inflight.values()), {}
        self.counters = Counters()
        for request in orphans:
            deliver(request, "error", self.stopped)

    def close(self) -> None:
        """Stop the engine; live and waiting requests end as cancelled."""
        with self.lock:
            try:
                self.conn.send(("close",))
            except OSError:
                pass  # already gone
            self.stopped = "the server is shutting down"
        self.reader.join(timeout=30)
        _stop_process(self.conn, self.process)


def _stop_process(conn, process, timeout: float = 30) -> None:
    """Wait for the engine to exit (it does once the pipe closes), else kill it."""
    conn.close()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _engine_main(conn, served: ServedModel, device: str, dtype: str, threads: int, settings: dict) -> None:
    """The engine process: load the model, run its batcher, and relay requests in and events out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the API process, which closes the engine
    sending = threading.Lock()  # the scheduler thread's sends and the final one at close
    try:
        model, utf8 = served.load(device, dtype)
        cpu_threads.configure(engine_threads(threads), next(model.parameters()).device)  # nothing on a GPU
        outgoing: list[tuple] = []
        requests: dict[int, Request] = {}
        last_sent: list[tuple] = [()]

        def send_step() -> None:
            """On the scheduler thread, after each step: its events and the counters, if anything changed."""
            with sending:
                counters = (batcher.queued, batcher.live_requests, batcher.generated_tokens, batcher.prompt_tokens,
                            batcher.cancelled_requests)
                if outgoing or counters != last_sent[0]:
                    events = outgoing[:]
                    del outgoing[:len(events)]
                    conn.send(("events", events, counters))
                    last_sent[0] = counters

        batcher = Batcher(model, served.tok, served.stop_ids, utf8, on_step=send_step, **settings)
        batcher.warm_up()
    except UserError as err:  # written for the user already, naming the checkpoint or flag at fault
        conn.send(("failed", str(err)))
        return
    except Exception as err:  # noqa: BLE001  (reported to the API process, which names the checkpoint)
        conn.send(("failed", f"{served.description}: cannot serve it: {type(err).__name__}: {err}"))
        return
    conn.send(("ready", batcher.buckets))
    closing = threading.Event()

    def watch() -> None:
        """A scheduler thread that dies (say, the GPU failed) takes the process with it, so the API
        process sees the pipe close and ends the requests rather than wait for ever."""
        batcher.thread.join()
        if not closing.is_set():
            log.error("the scheduler of %s stopped; ending its engine", served.name)
            os._exit(1)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()

    def emitter(ident: int):
        def emit(kind: str, value) -> None:
            timings = None
            if kind != "text":
                request = requests.pop(ident)
                first = None if request.first_token_at is None else request.first_token_at - request.submitted
                timings = (first, request.finished_at - request.submitted)
            outgoing.append((ident, kind, value, timings))
        return emit

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the API process is gone
            message = ("close",)
        if message[0] == "submit":
            made = []
            for ident, fields in message[1]:
                requests[ident] = Request(emit=emitter(ident), **fields)
                made.append(requests[ident])
            batcher.submit(*made)
        elif message[0] == "cancel":
            if (request := requests.get(message[1])) is not None:
                request.cancel()
        else:
            closing.set()
            batcher.close()
            try:
                send_step()
            except OSError:
                pass
            return
