"""What a trained model knows: validation perplexity and greedy fact completion.

Fact completion asks the model to continue a cloze prompt from the world ("李明住在") and counts
it right when the greedy continuation starts with the answer ("杭州"). Prompts come from
`eval_facts.jsonl`, written by `prepare`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.infer.generate import generate_batch
from tinyllm.train.loop import evaluate
from tinyllm.train.objectives import NextTokenLoss


def val_windows(token_dir: Path, seq_len: int, rows: int = 1) -> PackedBatches:
    """Consecutive windows of the val split (shorter than seq_len when the split is), `rows` a batch."""
    stream = TokenStream(token_dir, "val")
    return PackedBatches(stream, rows, min(seq_len, len(stream) - 1), seed=0, shuffle=False)


def perplexity(model, token_dir: Path, seq_len: int, max_tokens: int, device, dtype, rows: int = 16) -> dict:
    """Loss and perplexity on the val split, over consecutive windows up to `max_tokens`.

    The windows go through the model up to `rows` at a time (one a forward left a GPU idle:
    2.3-2.7 s a checkpoint for 390 windows of 512 on an H100, reports/gpu_speed.md), as many a
    batch as divide the windows scored, so that batching leaves out none of them (one a forward
    if their count is prime; the defaults' counts, 85 and 390, go 5 and 15 at a time)."""
    one_row = val_windows(token_dir, seq_len)
    n_windows = max(1, min(one_row.n_windows, max_tokens // one_row.seq_len))
    rows = max(r for r in range(1, rows + 1) if n_windows % r == 0)
    loss = evaluate(model, NextTokenLoss(), val_windows(token_dir, one_row.seq_len, rows), device, dtype,
                    max_batches=n_windows // rows)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_windows * one_row.seq_len}


@torch.no_grad()
def expert_balance(model, token_dir: Path, seq_len: int, max_windows: int = 16) -> dict:
    """For an MoE model: each expert's share of routing on validation text, and per layer the
    busiest expert's share over the fair share (1.0 is perfectly even; E means one expert takes all)."""
    batches = val_windows(token_dir, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loads = [model(b["input_ids"].to(device)).expert_load for _, b in zip(range(max_windows), batches)]
    model.train(was_training)
    load = torch.stack(loads).mean(0)  # (MoE layers, experts)
    first = model.config.moe.first_dense_layers
    return {"max_over_mean": {f"layer{first + i}": float(row.max() * row.numel()) for i, row in enumerate(load)},
            "load": {f"layer{first + i}": [round(float(v), 4) for v in row] for i, row in enumerate(load)}}


GENERATION_ROWS = 64
"""Prompts eval generates replies to at once. On a GPU every set's replies then go through one
compiled decode step (a smaller last chunk is padded to it), which stages/compile_ahead.py
compiles while pretraining runs."""


def fact_accuracy(model, tok: Tokenizer, items: list[dict], max_new_tokens: int, max_items: int,
                  seed: int, batch_size: int = GENERATION_ROWS) -> tuple[dict, list[dict]]:
    """Greedy cloze accuracy overall, per attribute and per person split.

    Each prompt starts after <|endoftext|>, as a document does in training. A completion is right
    when it starts with the answer, so it is cut at as many tokens as the longest answer has bytes
    (an ordinary token decodes to at least one byte): the same verdicts as at max_new_tokens in
    fewer decode steps (17 against 44 in the default world), since a pretrained model seldom
    stops before its budget.

    Returns:
        (metrics, rows): rows hold prompt, answer, output and correctness for the report.
    """
    if len(items) > max_items:
        items = random.Random(seed).sample(items, max_items)
    eot = special_id(tok, ENDOFTEXT)
    hits: dict[str, list[bool]] = defaultdict(list)
    rows = []
    prompts = [[eot] + tok.encode(item["prompt"], add_special_tokens=False).ids for item in items]
    budget = min(max_new_tokens, max(len(item["answer"].encode()) for item in items))
    outputs = [tok.decode(ids) for start in range(0, len(prompts), batch_size)
               for ids in generate_batch(model, prompts[start:start + batch_size], budget,
                                         stop_ids={eot}, pad_id=eot, pad_to_rows=batch_size)]
    for item, output in zip(items, outputs):
        correct = output.startswith(item["answer"])
        rows.append({**item, "output": output, "correct": correct})
        hits["overall"].append(correct)
        hits[f"attribute/{item['attribute']}"].append(correct)
        hits[f"split/{item.get('split', '-')}"].append(correct)
    metrics = {key: sum(v) / len(v) for key, v in sorted(hits.items())}
    metrics["n_prompts"] = len(items)
    return metrics, rows

