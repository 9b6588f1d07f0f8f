"""Next-token cross-entropy straight from the last hidden states, a chunk of positions at a time.

The plain way computes logits = hidden @ Wᵀ for every position (tokens × vocab: 65,536 × 6,400
at batch 128 × 512), casts them to fp32, takes the cross-entropy, and keeps the logits for the
backward pass. Here each chunk's logits exist only while the chunk is processed: the forward
pass also computes the chunk's gradients (for softmax cross-entropy, d loss / d logits is
softmax − one-hot) and multiplies them into the gradients of the hidden states and of W at once.
The backward pass then only scales what was stored. Same loss, same gradients, up to rounding.

    loss_sum, tokens = linear_cross_entropy(hidden, lm_head.weight, labels)   # summed over labelled positions
"""

from __future__ import annotations

import torch

from tinyllm.data.labels import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 26
"""Logits per chunk (rows × vocab): 64M, 256 MB in fp32."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            raw = h @ weight.t()  # bf16 under autocast: the gradients go back at that precision too
            logits = raw.float()
            labelled = y != IGNORE_INDEX
            target = y.clamp(min=0).unsqueeze(1)
            log_norm = logits.logsumexp(dim=1, keepdim=True)
            total += ((log_norm - logits.gather(1, target)).squeeze(1) * labelled).sum()
            grad = (logits - log_norm).exp_()  # softmax − one-hot, on labelled rows only
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad = (grad * labelled.unsqueeze(1)).to(raw.dtype)
            grad_hidden[start:start + rows] = (grad @ weight.to(raw.dtype)).to(hidden.dtype)
            grad_weight += (grad.t() @ h.to(raw.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy of (hidden @ weightᵀ) against `labels` over the labelled positions,
    the number of labelled positions). hidden: (..., dim); labels: (...), IGNORE_INDEX where no
    loss is wanted."""
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, rows), (labels != IGNORE_INDEX).sum()
