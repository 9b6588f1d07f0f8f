"""Can the default model's shape learn held-out sums at all? Arithmetic alone, two answer formats.

    python reports/bench/grpo/arith_probe.py direct 2000      # "12 + 7 = 19"
    python reports/bench/grpo/arith_probe.py count 2000       # "12 + 7 : 13 1 14 2 … 19 7 = 19"

Trains a fresh 192×4 decoder (the pipeline's model shape) on the world's sums and differences
within 20 (tinyllm.data.world), 40 held out (seeded), numbers as whole tokens as BPE makes them,
loss on the answer only; prints greedy exact-match on 40 training and the 40 held-out problems
four times. "count" writes the answer as a walk along the number line, each step with its index,
so only "the next number" and "is the index b yet" are needed. About 1.5 (direct) or 6 (count)
minutes on 2 CPU cores. Not part of CI; results in reports/grpo.md.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from tinyllm.config import ModelConfig
from tinyllm.data.world import _arithmetic_problems as problems
from tinyllm.data.world import arithmetic_result
from tinyllm.model.transformer import Transformer

PLUS, MINUS, EQUALS, COLON, EOS, PAD = range(41, 47)  # numbers 0..40 are their own token ids
VOCAB = 48


def encode(problem: tuple[str, int, int], counting: bool) -> tuple[list[int], list[int]]:
    """(prompt, answer) token ids."""
    op, a, b = problem
    answer = [COLON] if counting else []
    if counting:
        x = a
        for i in range(1, b + 1):
            x += 1 if op == "+" else -1
            answer += [x, i]
    return [a, PLUS if op == "+" else MINUS, b], answer + [EQUALS, arithmetic_result(*problem), EOS]


def solved(model: Transformer, prompt: list[int], answer: list[int]) -> bool:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(answer)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS:
                break
    return ids[len(prompt):] == answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["direct", "count"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    heldout = set(rng.sample(problems(), 40))
    train = [encode(p, args.format == "count") for p in problems() if p not in heldout]
    test = [encode(p, args.format == "count") for p in sorted(heldout)]
    width = max(len(p) + len(a) for p, a in train)
    torch.manual_seed(args.seed)
    model = Transformer(ModelConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512, max_seq_len=128,
                                    vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:  # warm-up, then cosine to a tenth
            group["lr"] = 2e-3 * min(1, step / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        ids = torch.full((32, width), PAD)
        labels = torch.full((32, width), -100)
        for row, (prompt, answer) in enumerate(rng.choices(train, k=32)):
            seq = prompt + answer
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, len(prompt) - 1:len(seq) - 1] = torch.tensor(answer)
        loss = F.cross_entropy(model(ids).logits.reshape(-1, VOCAB), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (args.steps // 4) == 0:
            model.eval()
            seen = sum(solved(model, *item) for item in random.Random(1).sample(train, 40)) / 40
            held = sum(solved(model, *item) for item in test) / len(test)
            model.train()
            print(f"{args.format} step {step}: loss {loss.item():.3f}, training problems {seen:.2f}, "
                  f"held-out {held:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
