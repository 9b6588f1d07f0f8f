"""The generation queue behind the HTTP API: one thread runs every generation, one at a time.

Requests are served first come, first served. A model is never used by two requests at once, so
there is no cross-talk, and a seeded or greedy reply is the same whether its request came alone or
with 19 others. The cost is latency under load: a request waits for the ones before it.

    worker = GenerationWorker()
    job = Job(model, prompt_ids, max_tokens=64, emit=lambda kind, value: ...)
    worker.submit(job)          # emit("text", piece)... then emit("end", Finish(...))
    job.cancel()                # e.g. the client went away: the worker moves on at the next token
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tinyllm.infer.generate import stream_tokens
from tinyllm.infer.text import TextStream
from tinyllm.infer.utf8 import Utf8Guard

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    model: object
    tok: object
    stop_ids: set[int]
    description: str
    utf8: Utf8Guard | None = None
    """Keeps sampled replies valid UTF-8 (`load_served_models` builds it from the tokenizer)."""

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len


@dataclass
class Finish:
    reason: str
    """"stop" (end of reply or a stop string), "length" (max_tokens or the context) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    served: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    """Called from the worker thread: ("text", piece), then ("end", Finish) or ("error", message)."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class GenerationWorker:
    def __init__(self):
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: Job | None = None
        self.cancelled_jobs = 0
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.active = job
            try:
                job.emit("end", self._generate(job))
            except Exception as err:  # a bug must not kill the worker: the client gets a 500
                log.exception("generation failed")
                try:
                    job.emit("error", f"{type(err).__name__}: {err}")
                except Exception:  # noqa: BLE001 (e.g. the event loop is closing: nobody is listening any more)
                    log.warning("could not report the failure to the client")
            finally:
                self.active = None

    def _generate(self, job: Job) -> Finish:
        served = job.served
        budget = min(job.max_tokens, served.context - len(job.prompt_ids))
        stream = TextStream(served.tok, job.stop)
        count, reason = 0, "length"
        if job.cancelled.is_set():  # the client left while waiting in the queue
            self.cancelled_jobs += 1
            return Finish("cancelled", len(job.prompt_ids), 0)
        tokens = stream_tokens(served.model, job.prompt_ids, budget, stop_ids=served.stop_ids,
                               temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=job.seed,
                               repetition_penalty=job.repetition_penalty, utf8=served.utf8)
        for token in tokens:
            if job.cancelled.is_set():
                self.cancelled_jobs += 1
                tokens.close()
                return Finish("cancelled", len(job.prompt_ids), count)
            count += 1
            if piece := stream.push(token):
                job.emit("text", piece)
            if stream.stopped:
                reason = "stop"
                tokens.close()
                break
        else:
            reason = "length" if count == budget else "stop"  # fewer tokens: the model ended its reply
        if piece := stream.finish():
            job.emit("text", piece)
        return Finish(reason, len(job.prompt_ids), count)
