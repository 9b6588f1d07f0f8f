"""Where does a LoRA step's time go? (issue 22: on the H200 the lora stage ran at 48–77% of
pretraining's tokens/s in different runs, with a 32 s first step, reports/gpu_speed.md.)

    python reports/bench/gpu/lora_step.py --model 768x8 --device cuda --seq-len 512 --batch-size 32
    python reports/bench/gpu/lora_step.py --model tiny --device cpu --seq-len 128 --batch-size 8 --steps 3

Random weights of a preset, random token rows (every position labelled: the shapes are what a step
costs), bf16 autocast, AdamW, the model compiled as the training engine compiles it. Four
ways to train the same rows, so each difference is one cause:
- full: every weight trains (the sft stage's step);
- frozen base: no adapters, only the norms train (the backward through frozen matmuls, alone);
- lora: peft adapters on every Linear, as the lora stage adds them (`add_lora`, params' rank);
- lora + new tokens: the same with peft's trainable embedding rows for 32 token ids
  (`lora.train_new_tokens`, the stage's default).
For each: seconds of the first step (compilation), milliseconds a step and positions a second (both
from the median step after the warm-up); with --profile, the profiler's top ten events in one more
step of the last kind (lora + new tokens). --cuda-graphs compiles with mode="reduce-overhead"'s option
(forward and backward replayed as CUDA graphs): on the H200 the LoRA step waits on the host's
kernel launches (reports/gpu_speed.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from profiling import profile_table  # this folder's modules, beside this script
from regions import add_regions_flag, regions_compile_kwargs

from tinyllm.bench import PRESETS
from tinyllm.config import LoRAConfig, ModelConfig, TrainConfig
from tinyllm.model.transformer import Transformer
from tinyllm.train.engine import build_optimizer
from tinyllm.train.lora import add_lora
from tinyllm.train.objectives import NextTokenLoss
from tinyllm.train.runtime import INDUCTOR_OPTIONS

KINDS = ("full", "frozen base", "lora", "lora + new tokens")


def build(kind: str, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Transformer(cfg)
    if kind == "full":
        return model.to(device)
    if kind == "frozen base":
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith("norm.weight")
        return model.to(device)
    token_rows = list(range(100, 132)) if kind == "lora + new tokens" else []
    return add_lora(model, LoRAConfig(), token_rows=token_rows).to(device)


def time_steps(kind: str, cfg: ModelConfig, batches: list[dict], args, device: torch.device, profile: bool
               ) -> tuple[float, float, float, str]:
    """(first step s, median ms a step, positions a second at that step, the profile table if `profile`)."""
    model = build(kind, cfg, device).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device)
    options = {"options": {**INDUCTOR_OPTIONS, "triton.cudagraphs": True}} if args.cuda_graphs else args.compile_kwargs
    step_model = torch.compile(model, **options) if args.compile else model
    objective = NextTokenLoss()

    def step(batch: dict) -> None:
        if args.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective(step_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(batches[i % len(batches)])
        seconds.append(time.perf_counter() - start)
    timed = seconds[args.warmup:]
    table = profile_table(lambda: step(batches[0]), device) if profile else ""
    median = statistics.median(timed)
    return seconds[0], 1000 * median, batches[0]["input_ids"].numel() / median, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x8", choices=list(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=6400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--cuda-graphs", action="store_true", help='CUDA graphs (the option of mode="reduce-overhead")')
    parser.add_argument("--profile", action="store_true")
    add_regions_flag(parser)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}; "
                        "the first is the one the others are compared with")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        parser.error(f"--kinds: {', '.join(sorted(set(kinds) - set(KINDS)))} is not one of {', '.join(KINDS)}")
    if args.cuda_graphs and args.regions:  # torch.compile takes a mode or Inductor options, not both
        parser.error("--cuda-graphs and --regions: one at a time")
    args.compile_kwargs = regions_compile_kwargs(parser, args)
    device = torch.device(args.device)
    cfg = ModelConfig(**PRESETS[args.model], max_seq_len=args.seq_len, vocab_size=args.vocab)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=generator)
        batches.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.model} on {name}, bf16, {'compiled' if args.compile else 'eager'}, "
          f"{args.batch_size} rows of {args.seq_len}, torch {torch.__version__}"
          f"{', CUDA graphs' if args.cuda_graphs else ''}{', nested layer regions' if args.regions else ''}\n")
    print(f"| training | first step (s) | ms a step | positions/s | of {kinds[0]}'s |")
    print("|---|---|---|---|---|")
    results = {kind: time_steps(kind, cfg, batches, args, device, args.profile and kind == kinds[-1])
               for kind in kinds}
    for kind, (first, ms, rate, _) in results.items():
        print(f"| {kind} | {first:.1f} | {ms:.1f} | {rate:,.0f} | {rate / results[kinds[0]][2]:.0%} |", flush=True)
    if args.profile:
        print(f"\nTop kernels in one '{kinds[-1]}' step:\n{results[kinds[-1]][3]}")


if __name__ == "__main__":
    main()
