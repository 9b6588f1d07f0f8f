"""How often does a greedy reply pass a near-tie? (issue 20: on the H200, 0-7 of 32 greedy replies
of random 768x8 weights parted from their solo runs per bench run, each, where logged, at a step
where the two best tokens were 0.000-0.016 apart in log-prob.)

    python reports/bench/serving/tie_margins.py artifacts/grpo --models checkpoint,768x8

For each model (`checkpoint`: the trained weights; a preset name: random weights of that shape with
the checkpoint's tokenizer, as `tinyllm bench serve --model` serves them) it decodes bench serve's 32
greedy questions, one at a time, and at every step takes the margin between the two best logits.
bf16 keeps 8 significant bits, so two logits closer than one bf16 step at the top logit's size
(`ulp`) can swap under any change in the last bit of a sum: a different batch shape, kernel or
reduction order. The table counts such steps, and replies that pass at least one. Each step runs
the whole sequence again (no cache: the plainest forward), so 32 replies of 256 tokens at 768x8
take about 7 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch
from graph_check import served_model  # this folder's script, beside this one

from tinyllm.bench import PRESETS
from tinyllm.data.tokenizer import render_chat
from tinyllm.serve.loadgen import numbered_questions


def bf16_step(value: float) -> float:
    """The spacing of bf16 numbers around `value` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0 ** -133


@torch.no_grad()
def margins(model, prompt: list[int], stop_ids: set[int], max_tokens: int) -> list[tuple[float, float]]:
    """(top-2 logit margin, bf16 step at the top logit) at each step of the greedy reply."""
    device = next(model.parameters()).device
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=device)).logits[0, -1].float()
        top = logits.topk(2).values
        out.append((float(top[0] - top[1]), bf16_step(float(top[0]))))
        token = int(logits.argmax())
        if token in stop_ids:
            break
        ids.append(token)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--models", default="checkpoint,768x8", help="checkpoint and/or preset names")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m != "checkpoint" and m not in PRESETS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} is neither 'checkpoint' nor a preset ({', '.join(PRESETS)})")
    asks = numbered_questions(args.questions)
    print(f"{args.questions} greedy replies of up to {args.max_tokens} tokens, weights in {args.dtype}, "
          f"{args.device}\n")
    print("| model | steps | median margin | mean bf16 step at the top | steps within one bf16 step (≤) | within two | "
          "replies passing a step within one |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        preset = None if name == "checkpoint" else name
        served, model, _ = served_model(args.checkpoint, preset, args.device, args.dtype)
        replies = [margins(model, served.tok.encode(render_chat([{"role": "user", "content": q}], True)).ids,
                           served.stop_ids, args.max_tokens) for q in asks]
        steps = [m for reply in replies for m in reply]
        within = [sum(gap <= k * ulp for gap, ulp in steps) for k in (1, 2)]
        passing = sum(any(gap <= ulp for gap, ulp in reply) for reply in replies)
        label = f"{name} ({'trained' if name == 'checkpoint' else 'random'})"
        print(f"| {label} | {len(steps)} | {statistics.median(g for g, _ in steps):.3f} | "
              f"{statistics.mean(u for _, u in steps):.4f} | {within[0]} ({within[0] / len(steps):.1%}) | "
              f"{within[1]} ({within[1] / len(steps):.1%}) | {passing}/{len(replies)} |", flush=True)


if __name__ == "__main__":
    main()
