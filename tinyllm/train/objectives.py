"""Objectives: what a stage optimises. The loop calls `objective(model, batch) -> (loss, metrics)`.

Pretraining and SFT both use next-token cross-entropy; they differ in the batches (SFT labels
are IGNORE_INDEX outside assistant replies), not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyllm.data.labels import IGNORE_INDEX


class NextTokenLoss:
    """Mean cross-entropy over every labelled position (+ the MoE balance loss, inside the model).

    For an MoE model the extras report the balance loss and each layer's expert load (share of
    routing assignments per expert), which the loop logs as train/balance_loss and
    train/moe/layer<i>/expert<j>.
    """

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        if "token_weight" in batch:  # one rank's share of a batch (tinyllm.train.distributed.rank_share)
            out = model(batch["input_ids"])
            token_losses = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
            loss = token_losses * batch["token_weight"] + (0 if out.balance_loss is None else out.balance_loss)
        else:
            out = model(batch["input_ids"], labels=batch["labels"])
            loss = out.loss
        if out.expert_load is None:
            return loss, {}
        extras = {"balance_loss": out.balance_loss.detach()}
        first = getattr(model, "module", model).config.moe.first_dense_layers  # through a DDP wrapper
        for i, layer_load in enumerate(out.expert_load):
            extras.update({f"moe/layer{first + i}/expert{j}": share for j, share in enumerate(layer_load)})
        return loss, extras


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


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al., 2023) from summed reply log-probs: B chosen rows, then their B rejected rows.

    The implicit reward of a reply is β·(log π(reply) − log π_ref(reply)); the loss is
    −log σ(reward_chosen − reward_rejected): log 2 ≈ 0.693 while π = π_ref, falling as the policy
    raises the chosen reply relative to the rejected one.
    """
    chosen, rejected = (beta * (policy_logps - ref_logps)).chunk(2)
    margin = chosen - rejected
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {"reward_accuracy": (margin > 0).float().mean(), "chosen_reward": chosen.mean(),
                  "rejected_reward": rejected.mean(), "margin": margin.mean()}


class DPOLoss:
    """`dpo_loss` on a batch from `PreferenceBatches`, whose "ref_logps" the frozen reference
    model computed once before training (no second model in memory).

    With `nll_coef` > 0 the chosen replies' negative log-likelihood per token is added (RPO, Pang
    et al. 2024): DPO alone raises a chosen reply relative to its rejected one, which need not
    make it the reply the model picks; the NLL term does.
    """

    def __init__(self, beta: float, nll_coef: float = 0.0):
        self.beta, self.nll_coef = beta, nll_coef

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logps = sequence_logprobs(model, batch["input_ids"], batch["labels"])
        loss, extras = dpo_loss(logps, batch["ref_logps"], self.beta)
        if self.nll_coef:
            chosen_tokens = (batch["labels"].chunk(2)[0] != IGNORE_INDEX).sum().clamp(min=1)
            extras["chosen_nll"] = -logps.chunk(2)[0].sum() / chosen_tokens
            loss = loss + self.nll_coef * extras["chosen_nll"]
        return loss, extras
