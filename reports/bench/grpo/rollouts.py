"""GRPO rollout throughput: generated tokens/s of the grpo stage's sampler → a table on stdout and
reports/bench/grpo/rollouts_<device>.md.

    python reports/bench/grpo/rollouts.py --model 768x8 --device cuda     # the issue's target shape
    python reports/bench/grpo/rollouts.py --model 192x4 --device cpu      # the default pipeline's
    python reports/bench/grpo/rollouts.py --folded     # bf16 decode steps fold grouped heads, as from commit
                                                       # 24689a5 until "The fold in bf16" (reports/gpu_speed.md)

It runs `RolloutBatches._rollout` itself (the stage's code: prompts from artifacts/data/grpo.jsonl
rendered as chat, G samples each in one KV-cached batch, the bf16 sampler copy with CUDA-graph
decoding on a GPU) on a randomly initialised model of the given shape. A random model seldom
emits <|im_end|>, so every reply runs to the length cap: the figure is the sampler's speed at
that batch and length, not a property of a trained model's reply lengths. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from tinyllm.config import GRPOConfig, ModelConfig
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.model.transformer import StaticKVCache, Transformer
from tinyllm.train.distributed import Dist
from tinyllm.train.grpo import RolloutBatches
from tinyllm.train.runtime import device_name

ROOT = Path(__file__).resolve().parents[3]
SHAPES = {"192x4": dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512),
          "768x8": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=2, hidden_dim=2048)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=SHAPES, default="768x8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row, after one warm-up round")
    parser.add_argument("--folded", action="store_true",
                        help="fold the decode step's grouped heads in bf16 too (StaticKVCache.folded_dtypes)")
    args = parser.parse_args()
    if args.folded:
        StaticKVCache.folded_dtypes = (torch.float32, torch.bfloat16)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = load_tokenizer(ROOT / "artifacts/tokenizer")
    prompts = [json.loads(line) for line in (ROOT / "artifacts/data/grpo.jsonl").open()]
    lines = [(f"GRPO rollouts, {args.model}, {device_name(device)}, {str(dtype).removeprefix('torch.')}, "
              f"G = {args.group_size}, {'folded' if args.folded else 'unfolded'} query groups in bf16 "
              f"(a static cache on CUDA only), "
              f"torch {torch.__version__}, {platform.node()}"), "",
             "| prompts × G | max new tokens | generated tokens/s | s per round |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for max_new in args.max_new_tokens:
        torch.manual_seed(0)
        config = ModelConfig(**SHAPES[args.model], max_seq_len=max_new + 64, vocab_size=tok.get_vocab_size())
        model = Transformer(config).to(device)
        for n_prompts in args.prompts:
            cfg = GRPOConfig(batch_size=n_prompts, group_size=args.group_size, max_new_tokens=max_new)
            batches = RolloutBatches(model, tok, prompts, cfg, seed=0, dist=Dist(), dtype=dtype)
            batches._rollout(0)  # warm-up: CUDA graphs captured for this batch size
            speeds, seconds = [], []
            for r in range(1, args.rounds + 1):
                stats = batches._rollout(r)[0]
                speeds.append(float(stats["stat/rollout_tokens_per_sec"]))
                tokens = float(stats["stat/reply_length"]) * n_prompts * args.group_size
                seconds.append(tokens / speeds[-1])
            row = (f"| {n_prompts} × {args.group_size} | {max_new} | {sum(speeds) / len(speeds):,.0f} "
                   f"| {sum(seconds) / len(seconds):.2f} |")
            lines.append(row)
            print(row, flush=True)
    name = f"rollouts_{args.model}_{device_name(device).replace(' ', '_')}{'_folded' if args.folded else ''}.md"
    out = ROOT / "reports/bench/grpo" / name
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
