"""Objectives: what a stage optimises. The loop calls `objective(model, batch) -> (loss, metrics)`.

Pretraining and SFT both use next-token cross-entropy; they differ in the batches (SFT labels
are IGNORE_INDEX outside assistant replies), not here.
"""

from __future__ import annotations

import torch


class NextTokenLoss:
    """Mean cross-entropy over every labelled position."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch["input_ids"], labels=batch["labels"]).loss, {}
