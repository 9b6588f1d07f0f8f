"""Preference pairs → token ids with final-reply masks, and batches for DPO and its eval.

A record is `{"chosen": [msgs], "rejected": [msgs]}` (MiniMind's DPO format): two conversations
that share a context and differ in the last assistant message. Only that last reply is scored:
earlier turns are the same on both sides, so they would add equal terms and nothing else.

    pairs = encode_pairs(tok, records)                  # [((ids, mask), (ids, mask)), ...]
    batch = pack_pairs(pairs[:8], seq_len, pad_id)       # sequences 0..7 chosen, 8..15 rejected

DPO batches are packed (`pack_sequences`): the replies of a world are a few dozen tokens, so a row
per sequence would be mostly padding, and its length would change with every batch (a GPU
recompiles for each new shape). Packed, every row has the training window's width.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from tinyllm.data.chat import encode_conversations, pack_rows, pack_sequences, validate_conversation

if TYPE_CHECKING:
    import torch  # imported where batches are made: the prepare stage validates pairs without it (chat.py)

Encoded = tuple[np.ndarray, np.ndarray]


def validate_preference(obj) -> str | None:
    """Why a preference record is unusable, or None."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        return 'expected an object with "chosen" and "rejected" conversations'
    for side in ("chosen", "rejected"):
        problem = validate_conversation({"conversations": obj[side]})
        if problem:
            return f"{side}: {problem}"
    if obj["chosen"][:-1] != obj["rejected"][:-1]:
        return "chosen and rejected must share every message but the last"
    if obj["chosen"][-1]["content"] == obj["rejected"][-1]["content"]:
        return "chosen and rejected replies are identical (DPO would learn nothing: loss stuck at 0.693)"
    return None


def final_reply_only(mask: np.ndarray) -> np.ndarray:
    """Keep the mask's last run of True (the final assistant reply and its <|im_end|>)."""
    last = np.flatnonzero(mask)[-1]
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    out = np.zeros_like(mask)
    out[start:last + 1] = True
    return out


def encode_pairs(tok: Tokenizer, records: list[dict], system_prompt: str | None = None
                 ) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) of each record, each (ids, mask) with the mask on the final reply only.
    All sides are encoded in one `encode_conversations` call (batched: start-up, reports/gpu_speed.md)."""
    sides = encode_conversations(tok, [r[side] for r in records for side in ("chosen", "rejected")], system_prompt)
    sides = [(ids, final_reply_only(mask)) for ids, mask in sides]
    return list(zip(sides[0::2], sides[1::2], strict=True))


def truncated_labels(pairs: list[tuple[Encoded, Encoded]], seq_len: int) -> int:
    """Labelled tokens lost by keeping only the newest seq_len + 1 tokens of each row."""
    return int(sum(mask[:-(seq_len + 1)].sum() for pair in pairs for _, mask in pair))


def pack_pairs(pairs: list[tuple[Encoded, Encoded]], seq_len: int, pad_id: int, shares: int = 1, min_rows: int = 0
               ) -> dict[str, torch.Tensor]:
    """The 2B sequences of B pairs packed into rows of seq_len: "segments" numbers the chosen
    sides 0..B-1 and the rejected ones B..2B-1, in pair order. At least `min_rows` rows (per
    process), the rest padding.

    With `shares` = N processes (B divisible by N), pair j goes to process j % N, each process's
    pairs are packed on their own (numbered in its own order) to the same number of rows, and the
    rows are interleaved, so `rank_share`'s rows [rank::N] are that process's whole pairs, and the
    reference log-probs [rank::N] of the 2B sequences line up with them.
    """
    import torch

    if len(pairs) % shares:
        raise ValueError(f"{len(pairs)} pairs do not split evenly over {shares} processes")
    sides = _shares(pairs, shares)
    rows = _most_rows(sides, seq_len) if shares > 1 else 0
    packs = [pack_sequences(mine, seq_len, pad_id, min_rows=max(rows, min_rows)) for mine in sides]
    return {k: torch.stack([pack[k] for pack in packs], dim=1).flatten(0, 1) for k in packs[0]}


def _shares(pairs: list[tuple[Encoded, Encoded]], shares: int) -> list[list[Encoded]]:
    """Each process's sequences: its pairs' chosen sides, then their rejected ones."""
    return [[pair[side] for side in (0, 1) for pair in pairs[rank::shares]] for rank in range(shares)]


def _most_rows(sides: list[list[Encoded]], seq_len: int) -> int:
    """The most rows any process's sequences pack into."""
    return max(len(pack_rows(mine, seq_len)) for mine in sides)


def epoch_order(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order in which `PreferenceBatches` draws the pairs during one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def pairs_drawn(n_pairs: int, batch_size: int, seed: int, batches: int) -> np.ndarray:
    """The pairs (sorted indices) that the first `batches` batches of `PreferenceBatches` hold: all of
    them once the run reaches a second epoch, else the first `batches` batches of the first one.
    DPO scores the reference on these alone (the GPU preset draws 1,280 of its 5,220 pairs)."""
    if batches * batch_size >= n_pairs:
        return np.arange(n_pairs)
    return np.sort(epoch_order(n_pairs, seed, 0)[:batches * batch_size])


class PreferenceBatches:
    """Endless shuffled DPO batches: `batch_size` pairs each, packed (`pack_pairs`), with their
    reference log-probs ("ref_logps": chosen sides, then rejected sides).

    Args:
        pairs: encoded (chosen, rejected) pairs.
        ref_logps: (len(pairs), 2) reference log-probs of (chosen, rejected), from `pair_logprobs`.
        shares: processes the batches will be split over (`rank_share`).
        rows: pad every batch to at least this many rows (`most_rows`: one shape for all of them,
            so that a compiled step can replay as CUDA graphs).
    """

    def __init__(self, pairs: list[tuple[Encoded, Encoded]], ref_logps: torch.Tensor, batch_size: int,
                 seq_len: int, seed: int, pad_id: int, shares: int = 1, rows: int = 0):
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} preference pairs are fewer than one batch of {batch_size}")
        self.pairs, self.ref_logps = pairs, ref_logps
        self.batch_size, self.seq_len, self.seed, self.pad_id, self.shares = batch_size, seq_len, seed, pad_id, shares
        self.rows = rows

    def _chunks(self) -> Iterator[list[int]]:
        """The pairs of each batch, epoch after epoch."""
        for epoch in itertools.count():
            order = epoch_order(len(self.pairs), self.seed, epoch)
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield order[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for chunk in self._chunks():
            batch = pack_pairs([self.pairs[i] for i in chunk], self.seq_len, self.pad_id, self.shares, self.rows)
            batch["ref_logps"] = self.ref_logps[chunk].T.reshape(-1)  # chosen column, then rejected
            yield batch

    def most_rows(self, batches: int) -> int:
        """The most rows any of the first `batches` batches packs into (one process's share)."""
        return max(_most_rows(_shares([self.pairs[i] for i in chunk], self.shares), self.seq_len)
                   for chunk in itertools.islice(self._chunks(), batches))
