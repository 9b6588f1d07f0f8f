"""Objectives: what a stage optimises. The loop calls `objective(model, batch) -> (loss, metrics)`.

Pretraining and SFT both use next-token cross-entropy; they differ in the batches (SFT labels
are IGNORE_INDEX outside assistant replies), not here.
"""

from __future__ import annotations

import torch

from tinyllm.model.transformer import IGNORE_INDEX


class NextTokenLoss:
    """Mean cross-entropy over every labelled position."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch["input_ids"], labels=batch["labels"]).loss, {}


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the labelled positions of each row: (B,).

    Computed in fp32 from the logits: summing bf16 log-probs over a reply loses the small
    differences preference training depends on.
    """
    logits = model(input_ids).logits.float()
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(-1)
