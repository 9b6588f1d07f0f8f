"""Does the compiled training step recompile when the batch's shape changes, as GRPO's rollouts do?

    python reports/bench/gpu/shape_guards.py --model 768x8            # the engine's compile options
    python reports/bench/gpu/shape_guards.py --model 768x8 --strict   # Inductor's defaults (the engine before)

In the GPU recipe (H100, 2026-12-06) GRPO's step recompiled once: Inductor fuses the two sums of a
norm's backward only above a size and guards the graph on it (`768*rows*len >= 5242880`), and a
round of shorter rollouts fell below. The engine now compiles with
`runtime.INDUCTOR_OPTIONS` (non-strict mix-order reductions: no size check, so no guard).

Random weights of a preset and random tokens, both batch dimensions marked dynamic and the
log-probs taken outside the model, as GRPO's objective does, bf16 autocast, AdamW. Steps at
rollout-like shapes (rows × length) that cross the guard's size both ways; printed: graphs compiled
by the first step and after all shapes, the first step's seconds, and ms a step (median of 10) at
128 × 64 and at 32 × 512, so the option's cost, if any, shows. Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig, RuntimeConfig, TrainConfig
from tinyllm.model.transformer import Transformer
from tinyllm.train.engine import build_optimizer
from tinyllm.train.objectives import token_logprobs
from tinyllm.train.runtime import compile_options, compiled_graphs

SHAPES = [(128, 64), (128, 40), (112, 90), (128, 24), (64, 48), (96, 72), (128, 64)]
"""Rows × length of successive rounds: 8,192 positions (above the guard's 6,827), then 5,120 (below),
10,080, 3,072, ..."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x8", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no Triton, no guard)")
    parser.add_argument("--strict", action="store_true", help="plain torch.compile (Inductor's default options)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig(**PRESETS[args.model], vocab_size=args.vocab_size, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device)
    step_model = torch.compile(model, **({} if args.strict else compile_options(RuntimeConfig(compile=True))))

    def step(rows: int, length: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (rows, length + 1), device=device)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        for dim in (0, 1):
            torch._dynamo.maybe_mark_dynamic(batch["input_ids"], dim)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):  # the model alone is compiled, as in GRPO
            logps, mask = token_logprobs(step_model, batch["input_ids"], batch["labels"])
            loss = -logps.sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    graphs = compiled_graphs()
    first = step(*SHAPES[0])
    after_first = compiled_graphs() - graphs
    for shape in SHAPES[1:]:
        step(*shape)
    after_all = compiled_graphs() - graphs
    timings = {shape: statistics.median(step(*shape) for _ in range(10)) for shape in ((128, 64), (32, 512))}
    after_timing = compiled_graphs() - graphs
    label = "Inductor's defaults" if args.strict else "engine (non-strict mix-order)"
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"| {args.model} | {label} | {after_first} | {after_all} / {after_timing} | {first:.1f} | "
          f"{timings[(128, 64)] * 1e3:.1f} | {timings[(32, 512)] * 1e3:.1f} |  {card}")


if __name__ == "__main__":
    main()
