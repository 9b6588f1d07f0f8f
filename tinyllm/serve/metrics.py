"""`GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4), written here
rather than through a client library: a few counters, gauges and two histograms.

    tinyllm_requests_total{model,reason}           finished requests, by finish reason
    tinyllm_queued_requests{model}                 waiting for a slot
    tinyllm_live_requests{model}                   in a slot (prefilling or decoding)
    tinyllm_generated_tokens_total{model}          completion tokens
    tinyllm_prompt_tokens_total{model}             prompt tokens admitted
    tinyllm_time_to_first_token_seconds{model}     histogram, from arrival to the first token
    tinyllm_request_latency_seconds{model}         histogram, from arrival to the end
"""

from __future__ import annotations

import bisect
import collections
import threading

from tinyllm.infer.batcher import Request
from tinyllm.serve.engine import EngineProcess

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        return out + [f"{name}_sum{{{labels}}} {self.total}", f"{name}_count{{{labels}}} {running}"]


class ServerMetrics:
    def __init__(self, batchers: dict[str, EngineProcess]):
        self.batchers = batchers
        self.lock = threading.Lock()  # requests end on the engines' reader threads, scrapes come from the event loop
        self.finished: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ttft = {name: Histogram(TTFT_BUCKETS) for name in batchers}
        self.latency = {name: Histogram(LATENCY_BUCKETS) for name in batchers}

    def observe(self, model: str, request: Request, reason: str) -> None:
        """A request ended ("stop", "length", "cancelled" or "error")."""
        with self.lock:
            self.finished[model, reason] += 1
            if request.first_token_at is not None:
                self.ttft[model].observe(request.first_token_at - request.submitted)
            if request.finished_at is not None:
                self.latency[model].observe(request.finished_at - request.submitted)

    def render(self) -> str:
        def family(name: str, kind: str, doc: str, samples: list[str]) -> list[str]:
            return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples]

        def per_model(value) -> list[str]:
            return [f'{{model="{name}"}} {value(batcher)}' for name, batcher in self.batchers.items()]

        with self.lock:
            lines = family("tinyllm_requests_total", "counter", "Finished requests, by finish reason.",
                           [f'tinyllm_requests_total{{model="{m}",reason="{r}"}} {n}'
                            for (m, r), n in sorted(self.finished.items())])
            for name, kind, doc, value in (
                    ("tinyllm_queued_requests", "gauge", "Requests waiting for a slot.", lambda b: b.queued),
                    ("tinyllm_live_requests", "gauge", "Requests in a slot.", lambda b: b.live_requests),
                    ("tinyllm_generated_tokens_total", "counter", "Completion tokens generated.",
                     lambda b: b.generated_tokens),
                    ("tinyllm_prompt_tokens_total", "counter", "Prompt tokens admitted.", lambda b: b.prompt_tokens)):
                lines += family(name, kind, doc, [name + sample for sample in per_model(value)])
            for name, doc, histograms in (
                    ("tinyllm_time_to_first_token_seconds", "From arrival to the first token.", self.ttft),
                    ("tinyllm_request_latency_seconds", "From arrival to the end of the request.", self.latency)):
                lines += family(name, "histogram", doc, [line for model, histogram in histograms.items()
                                                         for line in histogram.lines(name, f'model="{model}"')])
        return "\n".join(lines) + "\n"
