"""Is one decode launch deterministic? (issue 20: on the H200 the same seeded requests sent alone
twice gave different replies, reports/serving.md.)

    python reports/bench/serving/replay_check.py artifacts/grpo --model 768x8 --device cuda

Random weights of a preset (bf16 on a GPU, as the server loads them). 32 requests, half greedy and
half seeded, run to the end; then every slot is marked live again, so a launch over all 32 slots
has real prompts and replies in its cache. From a snapshot of everything a launch reads and
writes (the KV cache, positions, last tokens, sampling state), it replays, --repeats times each:
- the whole decode launch (on a GPU: the captured CUDA graph, model compiled, sampling inside),
- the model's forward alone, eagerly,
- the sampler alone, on one fixed set of logits,
and prints how many replays differ from the first, bitwise. The first path that differs is where
to look. (On the CPU the launch is eager and computes only the sampling options live requests ask
for; with the requests finished that is none, so there it checks the greedy path only. On a GPU
the captured launch always computes them all.)
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import torch

from tinyllm.bench import PRESETS, _random_checkpoint
from tinyllm.infer.batcher import Batcher, Request, _Options
from tinyllm.serve.loadgen import QUESTIONS
from tinyllm.serve.models import load_served_models

STATE = ("last", "temperature", "top_p", "penalty", "top_k", "seed", "steps", "utf8_state", "seen")


def run_to_the_end(batcher: Batcher, requests: list[dict]) -> None:
    done = [threading.Event() for _ in requests]
    batcher.submit(*[Request(emit=lambda kind, value, e=e: kind == "end" and e.set(), **r)
                     for r, e in zip(requests, done)])
    for event in done:
        event.wait(600)


def snapshot(batcher: Batcher) -> list[torch.Tensor]:
    cache = batcher.cache
    return [t.clone() for t in (*(getattr(batcher, name) for name in STATE), *cache.keys, *cache.values,
                                cache.positions, cache.live)]


def restore(batcher: Batcher, saved: list[torch.Tensor]) -> None:
    cache = batcher.cache
    for target, value in zip((*(getattr(batcher, name) for name in STATE), *cache.keys, *cache.values,
                              cache.positions, cache.live), saved):
        target.copy_(value)


def differing(outputs: list[tuple[torch.Tensor, ...]]) -> int:
    """Replays whose outputs are not bitwise equal to the first's."""
    first = outputs[0]
    return sum(any(not torch.equal(a, b) for a, b in zip(first, out)) for out in outputs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a pipeline checkpoint (its tokenizer, or its weights)")
    parser.add_argument("--model", choices=list(PRESETS), default=None, help="random weights of this shape instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target = _random_checkpoint(args.model, args.checkpoint, Path(tmp)) if args.model else args.checkpoint
        served = load_served_models([str(target)])[0]
        model, utf8 = served.load(args.device)
    batcher = Batcher(model, served.tok, served.stop_ids, utf8, compile=args.device.startswith("cuda"))
    batcher.warm_up()
    requests = [{"prompt_ids": served.tok.encode(q + f"（第{i}题）" * (1 + i % 3)).ids, "max_tokens": 96,
                 "ignore_eos": True, **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i})}
                for i, q in enumerate(QUESTIONS * 4)]
    run_to_the_end(batcher, requests)  # the scheduler is idle from here on: this thread drives
    batcher.cache.live[:] = True
    saved = snapshot(batcher)
    rows = slice(0, batcher.slots)

    def replay(run) -> list[tuple[torch.Tensor, ...]]:
        outputs = []
        for _ in range(args.repeats):
            restore(batcher, saved)
            with torch.no_grad():
                out = run()
            outputs.append(tuple(t.clone() for t in (out if isinstance(out, tuple) else (out,))))
        return outputs

    launch = batcher._decoder(batcher.slots)
    with torch.no_grad():
        logits = model(batcher.last[:, None], cache=batcher.cache.decode(batcher.slots)).logits[:, -1].clone()
    paths = {
        f"whole launch ({batcher.decode_steps} tokens, {'CUDA graph' if batcher.compile else 'eager'})": launch,
        "model forward alone, eager": lambda: model(batcher.last[:, None],
                                                    cache=batcher.cache.decode(batcher.slots)).logits,
        "sampler alone, fixed logits": lambda: batcher._pick(logits, rows, _Options.ALL),
    }
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"model {args.model or args.checkpoint}, {next(model.parameters()).dtype}, {name}, "
          f"{args.repeats} replays from one state")
    for path, run in paths.items():
        print(f"{path}: {differing(replay(run))} of {args.repeats - 1} replays differ from the first")
    batcher.close()


if __name__ == "__main__":
    main()
