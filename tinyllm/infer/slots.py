"""A KV cache of independent slots, for continuous batching: every row holds its own request at
its own position, so requests can join and leave a running batch at any step.

    cache = SlotKVCache(model.config, slots=32, device=..., dtype=...)
    model(chunk_ids, cache=cache.prefill(rows, starts))     # new prompt tokens into some slots
    model(last_tokens[:n, None], cache=cache.decode(n))      # one token for slots 0..n-1

`prefill` takes right-padded chunks (rows of different lengths; the padding lands on positions
the request has not reached yet, so it is overwritten before anything attends to it). `decode(n)`
covers the first n slots, a contiguous view with no copy; slots that hold no request compute
garbage that nobody reads. The decode view has fixed shapes and buffers, so on a GPU each n is
one CUDA graph.
"""

from __future__ import annotations

import torch

from tinyllm.config import ModelConfig


class SlotKVCache:
    def __init__(self, cfg: ModelConfig, slots: int, device, dtype, fold_query_groups: bool = False):
        self.fold_query_groups = fold_query_groups  # see KVCache.fold_query_groups
        shape = (slots, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = cfg.max_seq_len
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        """Where each slot's next token goes (= how many tokens it holds)."""
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        """Slots that hold a request in its decoding phase: only they advance in `decode`."""
        self.key_pos = torch.arange(self.max_len, device=device)
        self._decode_views: dict[int, DecodeView] = {}

    def decode(self, n: int) -> DecodeView:
        """The first n slots, one new token each (kept per n, so its buffers stay the same)."""
        if n not in self._decode_views:
            self._decode_views[n] = DecodeView(self, n)
        return self._decode_views[n]

    def prefill(self, rows: torch.Tensor, starts: torch.Tensor, fixed: bool = False) -> PrefillView:
        """New tokens for the slots `rows` (R,), starting at positions `starts` (R,). fixed: attend
        over whole slots, whatever the starts, so that nothing is read back to the host (a CUDA
        graph can hold the forward)."""
        return PrefillView(self, rows, starts, fixed)


class DecodeView:
    """Slots 0..n-1 decode one token each, at their own positions."""

    def __init__(self, cache: SlotKVCache, n: int):
        self.n, self.fold_query_groups = n, cache.fold_query_groups
        self.keys = [k[:n] for k in cache.keys]
        self.values = [v[:n] for v in cache.values]
        self.positions, self.live, self.key_pos = cache.positions[:n], cache.live[:n], cache.key_pos
        if self.keys[0].is_cuda:
            for buffer in (*self.keys, *self.values, self.positions, self.live):
                torch._dynamo.mark_static_address(buffer)

    def rope(self, table: torch.Tensor, T: int) -> torch.Tensor:
        # clamped: a request that reaches the context end inside a multi-token launch runs on, its
        # extra tokens dropped, and must not index past the table
        at = self.positions.clamp(max=table.shape[0] - 1)
        return table[at][:, None, None, :]  # (n, 1, 1, head_dim): broadcasts over heads

    def mask(self, T: int, key_valid, device) -> torch.Tensor:
        return (self.key_pos[None, :] <= self.positions[:, None])[:, None, None, :]  # (n, 1, 1, max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = self.positions.clamp(max=self.key_pos.numel() - 1)[:, None, None, None].expand_as(k)
        self.keys[layer].scatter_(2, where, k)
        self.values[layer].scatter_(2, where, v)
        return self.keys[layer], self.values[layer]

    def advance(self, T: int) -> None:
        self.positions += self.live.long()


class PrefillView:
    """Right-padded chunks of R requests' prompts, written into their slots."""

    def __init__(self, cache: SlotKVCache, rows: torch.Tensor, starts: torch.Tensor, fixed: bool = False):
        self.cache, self.rows, self.starts = cache, rows, starts
        self.fold_query_groups = cache.fold_query_groups
        self.furthest = cache.max_len if fixed else int(starts.max())
        self.fresh = not fixed and self.furthest == 0  # every chunk starts its prompt: plain causal attention

    def _end(self, T: int) -> int:
        """One past the last position any row reaches."""
        return min(self.furthest + T, self.cache.max_len)

    def _positions(self, T: int) -> torch.Tensor:
        return (self.starts[:, None] + self.cache.key_pos[:T]).clamp(max=self.cache.max_len - 1)  # (R, T)

    def rope(self, table: torch.Tensor, T: int) -> torch.Tensor:
        return table[self._positions(T)][:, None]  # (R, 1, T, head_dim)

    def mask(self, T: int, key_valid, device) -> torch.Tensor | None:
        if self.fresh:
            return None
        end = self._end(T)
        return (self.cache.key_pos[None, None, :end] <= self._positions(T)[:, :, None])[:, None]  # (R, 1, T, end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = (self.rows[:, None], slice(None), self._positions(k.shape[2]))
        self.cache.keys[layer][where] = k.transpose(1, 2)  # indexed as (R, T, heads, head_dim)
        self.cache.values[layer][where] = v.transpose(1, 2)
        if self.fresh:
            return k, v
        end = self._end(k.shape[2])
        return self.cache.keys[layer][self.rows, :, :end], self.cache.values[layer][self.rows, :, :end]

    def advance(self, T: int) -> None:
        pass  # the scheduler knows each row's real chunk length and sets the positions itself
