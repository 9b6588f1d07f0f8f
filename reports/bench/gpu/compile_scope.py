"""How long compiling takes, whole model against one decoder layer at a time (issue 22: a training
stage's start-up must stay under 30 s; a cold `torch.compile` of 768×8 cost 25–45 s of it).

    python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 --batch-size 32
    python reports/bench/gpu/compile_scope.py --model tiny --device cpu --seq-len 128 --batch-size 16

Each scope runs in a fresh process with an empty inductor cache, so every compile is cold:
- eager: no compiling;
- whole: `torch.compile(model)`, what the training engine does today;
- layers: `layer.compile()` on each decoder layer. The layers share their code, so Dynamo traces
  one graph for all of them; the embedding, the final norm, the head and the loss stay eager.
It prints the first step (compile included) and the median step after it, bf16 autocast, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SCOPES = ("eager", "whole", "layers")


def run_scope(scope: str, args: argparse.Namespace) -> dict:
    import torch

    from tinyllm.bench import PRESETS
    from tinyllm.config import ModelConfig
    from tinyllm.model.transformer import DecoderLayer, Transformer

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=args.seq_len, vocab_size=args.vocab_size))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if scope == "whole" else model
    if scope == "layers":
        for layer in (m for m in model.modules() if isinstance(m, DecoderLayer)):
            layer.compile()
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    from torch._dynamo.utils import counters

    return {"first_step_s": seconds[0], "step_ms": 1000 * statistics.median(seconds[1:]),
            "graphs": counters["stats"]["unique_graphs"], "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scope", choices=SCOPES, help="run this one scope here and print its JSON")
    args = parser.parse_args()
    if args.scope:
        print(json.dumps(run_scope(args.scope, args)))
        return
    print(f"| {args.model}, {args.device}, {args.batch_size} × {args.seq_len}, bf16 | first step (s) | "
          "step after it (ms) | graphs | loss |")
    print("|---|---|---|---|---|")
    for scope in SCOPES:
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: nothing from an earlier run
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--scope", scope], env=env,
                                 capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {scope} | {result['first_step_s']:.1f} | {result['step_ms']:.1f} | {result['graphs']} | "
              f"{result['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
