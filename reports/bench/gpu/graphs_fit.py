"""Does replaying the training step as CUDA graphs (`runtime.cuda_graphs`) lift a step that waits on
the host? Through `fit`, the one training loop, as the stages run it.

    python reports/bench/gpu/graphs_fit.py --kind lora --graphs auto
    python reports/bench/gpu/graphs_fit.py --kind lora --graphs false
    python reports/bench/gpu/graphs_fit.py --kind tiny-lora --device cpu --steps 4   # a smoke test (no graphs)

LoRA's step makes 451 matmul launches, and on a slow host its step took 42.2 ms against 24.4 ms
on a fast one while full fine-tuning took 18.2-19.3 ms on both (reports/gpu_speed.md). Random
weights of a preset (768x8, vocab 2,048) and random token rows of one shape (32 x 512, every
position labelled), bf16 autocast, compiled; `full` trains every weight (the sft stage's step),
`lora` peft adapters and 32 trainable token rows (the lora stage's). Printed: the steady tokens/s
(after the first log window), recompiles, the first step's seconds and the loss of each log
window, so a run with graphs can be checked against one without. Run each setting in a fresh
process. Not part of CI.
"""

from __future__ import annotations

import argparse

import torch

from tinyllm.bench import PRESETS, random_batches
from tinyllm.config import LoRAConfig, ModelConfig, RuntimeConfig, SFTConfig
from tinyllm.model.transformer import Transformer
from tinyllm.train.loop import fit
from tinyllm.train.lora import add_lora
from tinyllm.train.objectives import NextTokenLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["full", "lora", "tiny-full", "tiny-lora"], default="lora")
    parser.add_argument("--graphs", choices=["auto", "false"], default="auto", help="runtime.cuda_graphs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="768x8", help="the model of full and lora (PRESETS)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    preset = "tiny" if args.kind.startswith("tiny") else args.preset
    cfg = ModelConfig(**PRESETS[preset], vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if args.kind.endswith("lora"):
        model = add_lora(model, LoRAConfig(), token_rows=list(range(100, 132)))
    train = SFTConfig(max_steps=args.steps, batch_size=args.rows, lr=1e-4, min_lr=1e-5, warmup_steps=1,
                      log_interval=max(1, args.steps // 6))
    runtime = RuntimeConfig(device=args.device, dtype="bfloat16", compile=True,
                            cuda_graphs="auto" if args.graphs == "auto" else False)
    batches = random_batches(cfg.vocab_size, args.rows, args.seq_len, seed=0)  # the same rows in every run
    result = fit(model, NextTokenLoss(), batches, train, runtime,
                 fixed_shapes=True)  # as pretrain, sft and lora say of their packed rows
    final, losses = result.final, " ".join(f"{h['train/loss']:.6f}" for h in result.history)
    card = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"| {preset} {args.kind}, {args.rows} rows | {args.graphs} (replayed: {final['cuda_graphs']}) | "
          f"{final['tokens_per_sec']:,.0f} | {final['recompiles']} | {final['first_step_seconds']:.1f} | {losses} | "
          f"{card}")


if __name__ == "__main__":
    main()
