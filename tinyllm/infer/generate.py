"""Token generation with a preallocated KV cache: prefill the prompt once, then one token per step.

    ids = generate(model, prompt_ids, max_new_tokens=20, stop_ids={im_end_id})        # greedy
    replies = generate_batch(model, [ids_a, ids_b], max_new_tokens=20, stop_ids={...})  # together

Prompts generated together are left-padded to one length; padding is masked out of attention, so
each row gets the tokens it would get alone (up to float rounding in the last bits).

On a GPU, a dense model decodes with static shapes (`StaticKVCache`) and the decode step compiled
with CUDA graphs (`torch.compile(mode="reduce-overhead")`): one graph launch per token instead of a
hundred kernel launches. The cache and the compiled step are kept per model and batch size, so
only the first request of a shape pays for compilation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

from tinyllm import cpu_threads
from tinyllm.infer.utf8 import Utf8Guard
from tinyllm.model.transformer import KVCache, StaticKVCache, Transformer

_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {batch size: [free decoders]}


@contextlib.contextmanager
def decoding(model: Transformer, batch_size: int, max_len: int, static: bool | None = None
             ) -> Iterator[tuple[KVCache, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]]:
    """`with decoding(...) as (cache, step)`: `step(inputs, key_valid)` runs the model on new tokens
    through the cache and returns the last position's logits (B, vocab).

    static: use a StaticKVCache (compiled with CUDA graphs on a GPU); None picks it for a dense
    model on a GPU. An MoE routes with data-dependent shapes and always decodes dynamically.
    Static caches and their compiled steps are pooled per model and batch size: a generation
    checks one out and gives it back, so two at once (two web tabs) never share buffers.
    """
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if not decodes_static(model, static):
        cache = KVCache(model.config, batch_size, max_len, device, dtype)
        yield cache, lambda inputs, key_valid: model(inputs, cache=cache, key_valid=key_valid).logits[:, -1]
        return
    pool = _STATIC.setdefault(model, {}).setdefault(batch_size, [])
    cache, run = pool.pop() if pool else _static_decoder(model, batch_size, device, dtype)
    cache.reset()
    try:
        yield cache, run
    finally:
        pool.append((cache, run))


def decodes_static(model: Transformer, static: bool | None) -> bool:
    """Whether `decoding` uses a StaticKVCache: `static`, or when None, for a dense model on a GPU."""
    if static is None:
        return next(model.parameters()).device.type == "cuda" and not model.config.moe.enabled
    return static


def _static_decoder(model: Transformer, batch_size: int, device, dtype):
    cache = StaticKVCache(model.config, batch_size, model.config.max_seq_len, device, dtype)
    # The decoder is kept in _STATIC under the model, weakly: if it held the model itself, the
    # entry would keep its own key alive, and every model ever decoded (eval's checkpoints) would
    # stay in memory with its caches. Dynamo traces the dereference without a recompile per model.
    model_ref = weakref.ref(model)

    def step(inputs, key_valid):
        return model_ref()(inputs, cache=cache, key_valid=key_valid).logits[:, -1]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True) if device.type == "cuda" else step

    def run(inputs, key_valid):  # the prompt (any length) eagerly; each single new token as one graph
        return (compiled if inputs.shape[1] == 1 else step)(inputs, key_valid).clone()

    return cache, run


MIN_TEMPERATURE = 1e-6
"""Temperatures below it sample as at it: logits divided by less can overflow float32."""


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) token ids from (B, vocab) logits: argmax at temperature 0, else a sample.

    repetition_penalty > 1 makes every token in `seen` ((B, vocab) bool: already in the prompt or
    the reply) less likely, CTRL-style: its logit is divided by the penalty if positive, multiplied
    if negative. `allowed` ((B, vocab) bool) rules the other tokens out before top-k and top-p.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if repetition_penalty != 1.0 and seen is not None:
        logits = penalise_repeats(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k:
        logits = keep_top_k(logits, top_k)
    probs = torch.softmax(logits, -1)
    if top_p is not None and top_p < 1:
        probs = nucleus(probs, top_p)
    uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    return inverse_cdf(probs, uniform)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B,) draws from (B, vocab) probabilities (need not sum to 1) given (B,) uniforms in [0, 1):
    the first token whose cumulative probability passes u × the row's total. One random number a
    row; torch.multinomial drew one per token and was a quarter of a CPU rollout's time. In float64,
    u × total stays below the total, so a token of zero probability is never picked."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).squeeze(-1)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty on the `seen` tokens; `penalty` is a number or (B, 1) per row."""
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def keep_top_k(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """-inf for all but each row's top_k most likely tokens; `top_k` is a number or (B,) per row,
    0 keeping every token and more than the vocabulary meaning all of it."""
    k = torch.as_tensor(top_k, device=logits.device).clamp(max=logits.shape[-1]).expand(logits.shape[0])
    kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1).clamp(min=0)[:, None])
    return logits.masked_fill((k[:, None] > 0) & (logits < kth), float("-inf"))


def nucleus(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose probability reaches top_p (a
    number or (B, 1) per row); the result is not renormalised (sampling does not need it)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already enough
    outside[..., 0] = False  # the most likely token always stays, however small top_p is
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def _budget(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    if prompt_len == 0:
        raise ValueError("empty prompt")
    budget = min(max_new_tokens, model.config.max_seq_len - prompt_len)
    if budget <= 0:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in "
                         f"model.max_seq_len={model.config.max_seq_len}")
    return budget


@torch.no_grad()
def stream_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, repetition_penalty: float = 1.0, static: bool | None = None,
                  utf8: Utf8Guard | None = None) -> Iterator[int]:
    """Yield new token ids one by one; stops after a stop id (not yielded) or the length limit.

    Args:
        temperature: 0 means greedy (deterministic).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: seeds sampling, so the same call gives the same text.
        repetition_penalty: > 1 discourages tokens already in the prompt or the reply.
        static: decode with static shapes (see `decoding`); None decides by device and model.
        utf8: keep the reply valid UTF-8 (`Utf8Guard`: no token that breaks a character).
    """
    budget = _budget(model, len(prompt_ids), max_new_tokens)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    inputs = torch.tensor([prompt_ids], device=device)
    seen = _seen(inputs, model.config.vocab_size) if repetition_penalty != 1.0 else None
    state = utf8.start(1) if utf8 else None
    try:
        with decoding(model, 1, len(prompt_ids) + budget, static) as (_, step):
            for _ in range(budget):
                logits = step(inputs, None)
                tokens = next_tokens(logits, temperature, top_k, top_p, generator, repetition_penalty, seen,
                                     utf8.allowed(state) if utf8 else None)
                token = int(tokens)
                if seen is not None:
                    seen[0, token] = True
                if utf8:
                    state = utf8.advance(state, tokens)
                if token in stop_ids:
                    return
                yield token
                inputs = torch.tensor([[token]], device=device)
    finally:
        model.train(was_training)


def _seen(ids: torch.Tensor, vocab_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, vocab) bool: which tokens each row already holds (only where `valid`, if given)."""
    counts = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype) if valid is None else valid.to(counts.dtype))
    return counts > 0


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All new tokens of `stream_tokens` as a list."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
                   stop_ids: set[int] = frozenset(), pad_id: int = 0, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   repetition_penalty: float = 1.0, static: bool | None = None,
                   utf8: Utf8Guard | None = None, pad_to_rows: int | None = None) -> list[list[int]]:
    """New tokens for several prompts at once (each list ends before its first stop id).

    Every row runs until all rows have stopped or the budget (set by the longest prompt) is spent.

    pad_to_rows: on the static path (a GPU), decode fewer prompts in a batch of this many rows,
    the extra rows copies of the last prompt that are never sampled from (the replies, seeded ones
    too, are those without padding). Each new batch size compiles and captures its own decode
    step (seconds on a GPU); an eval's last, smaller chunk of each set then replays the full
    chunks' graph instead.
    """
    if not prompts or not all(prompts):
        raise ValueError("empty prompt")
    n = len(prompts)
    if pad_to_rows and n < pad_to_rows and decodes_static(model, static):
        prompts = prompts + [prompts[-1]] * (pad_to_rows - n)
    cpu_threads.follow()  # an eval generates batch after batch: keep sharing the CPU fairly
    width = max(len(p) for p in prompts)
    budget = _budget(model, width, max_new_tokens)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    B = len(prompts)
    inputs = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    padding = torch.full((B - n,), pad_id, dtype=torch.long, device=device)  # fed to the padding rows
    out = []
    try:
        with decoding(model, B, width + budget, static) as (cache, step):
            key_valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                inputs[row, width - len(ids):] = torch.tensor(ids, device=device)
                key_valid[row, :width - len(ids)] = False
            vocab = model.config.vocab_size
            seen = _seen(inputs[:n], vocab, key_valid[:n, :width]) if repetition_penalty != 1.0 else None
            state = utf8.start(n) if utf8 else None
            for _ in range(budget):
                # only the prompts' rows are sampled: a seed draws what it draws without padding
                logits = step(inputs, key_valid)[:n]
                tokens = next_tokens(logits, temperature, top_k, top_p, generator, repetition_penalty, seen,
                                     utf8.allowed(state) if utf8 else None)
                if seen is not None:
                    seen[torch.arange(n, device=device), tokens] = True
                if utf8:
                    state = utf8.advance(state, tokens)
                done |= torch.isin(tokens, stop)
                out.append(tokens.masked_fill(done, -1))
                if done.all():
                    break
                inputs = (torch.cat([tokens, padding]) if B > n else tokens)[:, None]
    finally:
        model.train(was_training)
    table = torch.stack(out, 1).tolist()
    return [row[:row.index(-1)] if -1 in row else row for row in table]
