"""Token generation with a preallocated KV cache: prefill the prompt once, then one token per step.

    ids = generate(model, prompt_ids, max_new_tokens=20, stop_ids={im_end_id})   # greedy
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tinyllm.model.transformer import KVCache, Transformer


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1:
        # nucleus: the smallest set of most likely tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already enough
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one; stops after a stop id (not yielded) or the length limit.

    Args:
        temperature: 0 means greedy (deterministic).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: seeds sampling, so the same call gives the same text.
    """
    cfg = model.config
    if not prompt_ids:
        raise ValueError("empty prompt")
    budget = min(max_new_tokens, cfg.max_seq_len - len(prompt_ids))
    if budget <= 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in model.max_seq_len={cfg.max_seq_len}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    cache = KVCache(cfg, 1, len(prompt_ids) + budget, device, next(model.parameters()).dtype)
    inputs = torch.tensor([prompt_ids], device=device)
    try:
        for _ in range(budget):
            logits = model(inputs, cache=cache).logits[0, -1]
            token = _next_token(logits, temperature, top_k, top_p, generator)
            if token in stop_ids:
                return
            yield token
            inputs = torch.tensor([[token]], device=device)
    finally:
        model.train(was_training)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new tokens of `stream_tokens` as a list."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))
