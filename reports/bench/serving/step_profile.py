"""Where a batched decode step's time goes, without HTTP (issue 20's GPU target).

    python reports/bench/serving/step_profile.py artifacts/grpo --model 768x8 --device cuda

Prints, for 32 requests of max_tokens each (ignore_eos) and each `--decode-steps` (tokens per
launch) in one process: tokens/s of the scheduler alone, and per launch the time in the graph
replay + token copy, and in the host's per-token work (`_emit`).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from tinyllm.bench import PRESETS, _random_checkpoint
from tinyllm.infer.batcher import Batcher, Request
from tinyllm.serve.loadgen import QUESTIONS
from tinyllm.serve.models import load_served_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", choices=list(PRESETS), default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--decode-steps", default="1,4,8,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target = _random_checkpoint(args.model, args.checkpoint, Path(tmp)) if args.model else args.checkpoint
        served = load_served_models([str(target)])[0]
        model, utf8 = served.load(args.device)
    batcher = Batcher(model, served.tok, served.stop_ids, utf8)
    timings = {"decode": 0.0, "emit": 0.0, "steps": 0}
    decode, emit = batcher._decode, batcher._emit

    def timed_decode():
        start = time.perf_counter()
        emit_before = timings["emit"]
        decode()
        timings["decode"] += time.perf_counter() - start - (timings["emit"] - emit_before)
        timings["steps"] += 1

    def timed_emit(*a):
        start = time.perf_counter()
        emit(*a)
        timings["emit"] += time.perf_counter() - start

    batcher._decode, batcher._emit = timed_decode, timed_emit
    for decode_steps in map(int, args.decode_steps.split(",")):
        batcher.decode_steps = decode_steps  # the buckets' graphs are captured again (the compiled model is kept)
        batcher._decoders.clear()
        batcher._warm = False
        batcher.warm_up()
        for round_ in range(2):
            done = threading.Semaphore(0)
            requests = [Request(served.tok.encode(QUESTIONS[i % len(QUESTIONS)]).ids, args.max_tokens,
                                emit=lambda kind, value, done=done: done.release() if kind == "end" else None,
                                temperature=0.7, seed=i, ignore_eos=True) for i in range(args.clients)]
            for key in timings:
                timings[key] = 0
            start = time.perf_counter()
            batcher.submit(*requests)
            for _ in requests:
                done.acquire()
            wall = time.perf_counter() - start
            steps = max(timings["steps"], 1)
            print(f"decode_steps {decode_steps}, round {round_}: {args.clients} x {args.max_tokens} tokens in "
                  f"{wall:.2f} s = {args.clients * args.max_tokens / wall:,.0f} tokens/s; {steps} decode launches, "
                  f"per launch: graph+copy {timings['decode'] / steps * 1e3:.3f} ms, emit "
                  f"{timings['emit'] / steps * 1e3:.3f} ms, other "
                  f"{(wall - timings['decode'] - timings['emit']) / steps * 1e3:.3f} ms", flush=True)
        graph = batcher._decoder(32)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            graph()[0].tolist()
        print(f"decode_steps {decode_steps}: graph replay + tolist alone, bucket 32: "
              f"{(time.perf_counter() - start) / 100 * 1e3:.3f} ms", flush=True)
    batcher.close()


if __name__ == "__main__":
    main()
