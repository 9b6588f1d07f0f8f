"""Cloze items (a prompt and the exact continuation that answers it) as teacher-forced batches,
with the loss on the answer's tokens only.

Pretraining on the embedded world validates on them (`world.split_fact_probes`): the loss on held-out
wording turns hundreds of steps before the model stops learning facts, so keeping the weights of
its lowest value kept a model that knew fewer facts, and which step it kept was a coin toss
between near-equal losses (reports/quality.md, "Which pretraining step knows the most").
"""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer

from tinyllm.data.labels import IGNORE_INDEX


def validate_cloze(obj) -> str | None:
    """Why a line is not a cloze item, or None (for `read_jsonl`)."""
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k] for k in ("prompt", "answer")):
        return 'not a cloze item {"prompt": non-empty text, "answer": non-empty text}'
    return None


def cloze_batches(tok: Tokenizer, items: list[dict], batch_size: int, seed: int, pad_id: int = 0
                  ) -> list[dict[str, torch.Tensor]]:
    """`items` ({"prompt", "answer"}) in a seeded order, `batch_size` a batch, right-padded: labels
    are the next token where it belongs to the answer, IGNORE_INDEX elsewhere. Where the tokenizer
    merges the prompt's end with the answer's start, the merged token counts as the answer's."""
    items = random.Random(seed).sample(items, len(items))
    rows = []
    for item in items:
        ids = tok.encode(item["prompt"] + item["answer"], add_special_tokens=False).ids
        prompt = tok.encode(item["prompt"], add_special_tokens=False).ids
        shared = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
        rows.append((ids, max(1, min(shared, len(ids) - 1))))  # at least one prompt and one answer token
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk) - 1
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, answer_at) in enumerate(chunk):
            input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[r, answer_at - 1:len(ids) - 1] = torch.tensor(ids[answer_at:])
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches
