"""Objectives: what a stage optimises. The loop calls `objective(model, batch) -> (loss, metrics)`.

Pretraining and SFT both use next-token cross-entropy; they differ in the batches (SFT labels
are IGNORE_INDEX outside assistant replies), not here.
"""

from __future__ import annotations

import torch

from tinyllm.config import GRPO_LOSS_NORMS
from tinyllm.data.labels import IGNORE_INDEX


class NextTokenLoss:
    """Mean cross-entropy over every labelled position (+ the MoE balance loss, inside the model).

    For an MoE model the extras report the balance loss and each layer's expert load (share of
    routing assignments per expert), which the loop logs as train/balance_loss and
    train/moe/layer<i>/expert<j>.
    """

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = model(batch["input_ids"], labels=batch["labels"])
        loss = out.loss
        if "token_weight" in batch:  # one rank's share of a batch (tinyllm.train.distributed.rank_share)
            loss = out.token_loss_sum * batch["token_weight"] + (0 if out.balance_loss is None else out.balance_loss)
        if out.expert_load is None:
            return loss, {}
        extras = {"balance_loss": out.balance_loss.detach()}
        first = getattr(model, "module", model).config.moe.first_dense_layers  # through a DDP wrapper
        for i, layer_load in enumerate(out.expert_load):
            extras.update({f"moe/layer{first + i}/expert{j}": share for j, share in enumerate(layer_load)})
        return loss, extras


def token_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) at each position, 0 where unlabelled; the labelled mask): both (B, T).
    `segments`: packed rows (`pack_sequences`), each position attending within its own sequence.

    Computed in fp32 from the logits: summing bf16 log-probs over a reply loses the small
    differences preference and RL training depend on.
    """
    logits = (model(input_ids) if segments is None else model(input_ids, segments=segments)).logits.float()
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return token_logp * mask, mask


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the labelled positions of each row: (B,)."""
    return token_logprobs(model, input_ids, labels)[0].sum(-1)


def packed_sequence_logprobs(model, batch: dict[str, torch.Tensor], n_sequences: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p(label), labelled tokens) of each of the `n_sequences` sequences packed in
    `batch` (`pack_sequences`: "segments" says which sequence a position belongs to)."""
    for key in ("input_ids", "segments"):  # the row count changes with the lengths: one graph for all of them
        torch._dynamo.maybe_mark_dynamic(batch[key], 0)
    token_logp, mask = token_logprobs(model, batch["input_ids"], batch["labels"], batch["segments"])
    index = batch["segments"].clamp(min=0).flatten()  # padding (-1) adds zeros to sequence 0
    logps = token_logp.new_zeros(n_sequences).index_add_(0, index, token_logp.flatten())
    counts = torch.zeros(n_sequences, device=index.device, dtype=torch.long).index_add_(0, index, mask.flatten().long())
    return logps, counts


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al., 2023) from summed reply log-probs: B chosen sequences, then their B rejected ones.

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
    """`dpo_loss` on a packed batch from `PreferenceBatches`, whose "ref_logps" the frozen
    reference model computed once before training (no second model in memory, no second pass).

    With `nll_coef` > 0 the chosen replies' negative log-likelihood per token is added (RPO, Pang
    et al. 2024): DPO alone raises a chosen reply relative to its rejected one, which need not
    make it the reply the model picks; the NLL term does.
    """

    def __init__(self, beta: float, nll_coef: float = 0.0):
        self.beta, self.nll_coef = beta, nll_coef

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logps, counts = packed_sequence_logprobs(model, batch, batch["ref_logps"].numel())
        loss, extras = dpo_loss(logps, batch["ref_logps"], self.beta)
        if self.nll_coef:
            extras["chosen_nll"] = -logps.chunk(2)[0].sum() / counts.chunk(2)[0].sum().clamp(min=1)
            loss = loss + self.nll_coef * extras["chosen_nll"]
        return loss, extras


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """GRPO's advantages from (prompts, G) rewards: each reward minus its group's mean, and with
    `scale` divided by the group's std (the original GRPO; Dr. GRPO drops the division, which
    weights questions that are nearly always right or wrong far above the rest). A group whose
    samples all score the same gets 0: it teaches nothing."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-6)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_coef: float, norm: str, max_new_tokens: int
              ) -> tuple[torch.Tensor, dict]:
    """The clipped policy-gradient loss of GRPO (Shao et al., 2024) on (B, T) per-token log-probs.

    ratio = π/π_old per token; the loss per token is −min(ratio·A, clip(ratio, 1±ε)·A), plus
    kl_coef × the k3 estimate of KL(π‖π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0. `norm` (one of
    GRPO_LOSS_NORMS) says how the per-token losses are averaged. Extras: the KL per token, and the
    share of reply tokens whose clipped term was the smaller one (clip fraction).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    per_token = (-torch.minimum(unclipped, clipped) + kl_coef * kl) * mask
    tokens = mask.sum().clamp(min=1)
    if norm == "token":
        loss = per_token.sum() / tokens
    elif norm == "sequence":
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif norm == "constant":
        loss = per_token.sum() / (mask.shape[0] * max_new_tokens)
    else:
        raise ValueError(f"norm={norm!r} must be one of {GRPO_LOSS_NORMS}")
    clipped_tokens = (clipped < unclipped) & mask
    return loss, {"kl": (kl * mask).sum() / tokens, "clip_fraction": clipped_tokens.sum() / tokens}


class GRPOLoss:
    """`grpo_loss` on a batch from `tinyllm.train.grpo.RolloutBatches`: the sampled replies with
    their advantages, the log-probs of the policy that sampled them ("old_logps") and of the
    starting model ("ref_logps"). The rollout's own statistics (reward, reply length, ...) ride
    in the batch as "stat/<name>" scalars and are passed on as extras, so the loop logs them.
    `fixed_shapes`: the rollouts are padded to one shape (`RolloutBatches`' fixed width), so the
    step compiles for that shape alone rather than for any."""

    def __init__(self, clip_eps: float, kl_coef: float, norm: str, max_new_tokens: int, fixed_shapes: bool = False):
        self.clip_eps, self.kl_coef, self.norm, self.max_new_tokens = clip_eps, kl_coef, norm, max_new_tokens
        self.fixed_shapes = fixed_shapes

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        for dim in () if self.fixed_shapes else (0, 1):  # rollouts change both with every round: one graph for all
            torch._dynamo.maybe_mark_dynamic(batch["input_ids"], dim)
        logps, mask = token_logprobs(model, batch["input_ids"], batch["labels"])
        loss, extras = grpo_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask,
                                 self.clip_eps, self.kl_coef, self.norm, self.max_new_tokens)
        extras.update({name.removeprefix("stat/"): value for name, value in batch.items() if name.startswith("stat/")})
        return loss, extras
