"""Conversations → token ids with loss masks, and packed SFT batches.

A conversation is rendered exactly as the tokenizer's ChatML template renders it; the loss
covers the assistant content of EVERY turn plus its closing <|im_end|> (so the model learns to
stop), and nothing else: not the system prompt, not the user turns, not the role headers.

    ids, mask = encode_conversation(tok, messages)          # mask[i]: token i is a target
    batches = ChatBatches(encode_conversations(tok, convs), batch_size=16, seq_len=128, seed=0)
    batch = pack_sequences([(ids, mask), ...], width=128, pad_id=pad)   # each sequence sees only itself

torch is imported where batches are made (here, in preference.py and in tokens.py), not at the
top: the data stages validate and encode conversations and never load it, which spared each of
them 2.3 s of imports on the GPU machine (reports/gpu_speed.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.data.tokenizer import IM_END, IM_START
from tinyllm.errors import DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def is_message(m) -> bool:
    """A chat message: {"role": one of ROLES, "content": string}."""
    return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)


def validate_conversation(obj) -> str | None:
    """Why a `{"conversations": [...]}` record is unusable, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        return 'expected an object with a "conversations" list'
    messages = obj["conversations"]
    if not messages:
        return '"conversations" is empty'
    for i, m in enumerate(messages):
        if not is_message(m):
            return f'message {i}: expected {{"role": one of {ROLES}, "content": string}}'
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (nothing to learn otherwise)"
    return None


def read_conversations(files: list[Path]) -> list[list[dict]]:
    """The message lists of every `{"conversations": [...]}` record in `files` (validated, file:line errors)."""
    return [rec["conversations"] for f in files for rec in read_jsonl(f, validate_conversation)]


def encode_conversation(tok: Tokenizer, messages: list[dict], system_prompt: str | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the ChatML rendering and a boolean mask of the tokens that carry loss."""
    return encode_conversations(tok, [messages], system_prompt)[0]


ENCODE_CHUNK = 4096
"""Message contents per `encode_batch` call: the tokenizer's Encoding objects are about 100 bytes a
token, so one call over a whole data set held 1 GB for 9.3M tokens; chunks of 4096 hold 0.2 GB and
are as fast (reports/gpu_speed.md, "Start-up on the host")."""


def encode_conversations(tok: Tokenizer, conversations: list[list[dict]], system_prompt: str | None = None
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_conversation` of each conversation, with the contents encoded in batches.

    A rendering is three pieces per message: the role header, the content with its <|im_end|>, and
    a newline. The byte-level pre-tokenizer splits at newlines and special tokens, so encoding the
    pieces apart and joining them equals encoding the whole rendered text (a test pins this). The
    headers and the newline are the same everywhere and are encoded once; the contents go to the
    tokenizer's `encode_batch`, which runs in Rust on every core. One call per piece took 2.8 s for
    the 28,082 SFT chats of the GPU preset world on 2 cores, in every stage that reads them, and
    this 1.3 s (reports/gpu_speed.md, "Start-up on the host").
    """
    if system_prompt:
        system = {"role": "system", "content": system_prompt}
        conversations = [c if c[0]["role"] == "system" else [system, *c] for c in conversations]
    newline = tok.encode("\n", add_special_tokens=False).ids
    headers: dict[str, list[int]] = {}
    contents = [f"{m['content']}{IM_END}" for c in conversations for m in c]
    encoded_contents = (enc.ids for start in range(0, len(contents), ENCODE_CHUNK)
                        for enc in tok.encode_batch(contents[start:start + ENCODE_CHUNK], add_special_tokens=False))
    encoded = []
    for messages in conversations:
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            if m["role"] not in headers:
                headers[m["role"]] = tok.encode(f"{IM_START}{m['role']}\n", add_special_tokens=False).ids
            header, body = headers[m["role"]], next(encoded_contents)
            ids += header + body + newline
            mask += [False] * len(header) + [m["role"] == "assistant"] * len(body) + [False] * len(newline)
        encoded.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    return encoded


PACK_WINDOW = 256
"""Conversations packed together (`ChatBatches`): enough for the rows to fill up. Each window is a
random draw of the epoch's shuffle, so its rows still mix unrelated conversations."""


class ChatBatches:
    """Endless packed SFT batches: whole conversations laid end to end in rows of seq_len+1.

    Each epoch shuffles the conversations and packs every PACK_WINDOW of them into rows by
    first-fit-decreasing; a row's tail is padded with <|endoftext|> that carries no loss. (Before,
    conversations went into rows in the shuffled order, a new row whenever the next did not fit:
    on conversations of MiniMind's lengths 23% of the positions were padding, reports/gpu_speed.md.)
    A conversation longer than a row is cut, and the labelled tokens lost are counted in
    `truncated_labels` (reported, never silent).
    Labels at position i are the target for input i: ids[i+1] where mask[i+1], else IGNORE_INDEX.
    """

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, seq_len: int, seed: int,
                 pad_id: int):
        if not examples:
            raise ValueError("no conversations to train on")
        row = seq_len + 1
        self.truncated_labels = int(sum(m[row:].sum() for _, m in examples))
        # a conversation whose replies all start past the row teaches nothing; a batch of only
        # such rows would have no labelled token at all (a NaN mean loss)
        self.examples = [(ids[:row], m[:row]) for ids, m in examples if m[:row].any()]
        if not self.examples:
            raise DataError(f"no conversation has an assistant reply within seq_len={seq_len} tokens; raise the "
                            "stage's seq_len (sft.seq_len, lora.seq_len) up to model.max_seq_len, or that too")
        if len(self.examples) < len(examples):
            log.warning("%d of %d conversations have no reply within seq_len=%d and are left out",
                        len(examples) - len(self.examples), len(examples), seq_len)
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
        self.epoch = 0

    def _rows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        width = self.seq_len + 1
        while True:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.examples))
            for start in range(0, len(order), PACK_WINDOW):
                window = order[start:start + PACK_WINDOW]
                rows = first_fit_decreasing([len(self.examples[i][0]) for i in window], width)
                for r in rng.permutation(len(rows)):  # not longest first
                    yield self._row([window[j] for j in rows[r]])
            self.epoch += 1

    def _row(self, members: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, mask, padding) of one row: the members' conversations end to end, then padding
        (array copies: on a GPU this runs between steps, and per-token Python would be the bottleneck)."""
        width = self.seq_len + 1
        ids, mask = np.full(width, self.pad_id, dtype=np.int64), np.zeros(width, dtype=bool)
        at = 0
        for i in members:
            ex_ids, ex_mask = self.examples[i]
            ids[at:at + len(ex_ids)], mask[at:at + len(ex_ids)] = ex_ids, ex_mask
            at += len(ex_ids)
        return ids, mask, np.arange(width) >= at

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of input_ids, labels and padding (True at the padded tail: counted apart in throughput)."""
        import torch

        rows = self._rows()
        while True:
            ids, mask, padding = map(np.stack, zip(*(next(rows) for _ in range(self.batch_size))))
            ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
            labels = torch.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)
            yield {"input_ids": ids[:, :-1], "labels": labels, "padding": torch.from_numpy(padding[:, :-1])}


def collate(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int, width: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad whole conversations to the longest one, or to `width` tokens where given (one
    shape for every batch); for per-sequence scores, not packing. "padding" marks the padded
    positions."""
    import torch

    longest = max(len(ids) for ids, _ in examples)
    if width is not None and width < longest:
        raise ValueError(f"width {width} is shorter than the longest example ({longest} tokens)")
    width = width or longest
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    lengths = torch.tensor([len(ex_ids) for ex_ids, _ in examples])
    for row, (ex_ids, ex_mask) in enumerate(examples):
        ids[row, : len(ex_ids)] = torch.from_numpy(ex_ids)
        mask[row, : len(ex_mask)] = torch.from_numpy(ex_mask)
    return {"input_ids": ids[:, :-1], "labels": torch.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX),
            "padding": torch.arange(width - 1) >= lengths[:, None]}


def first_fit_decreasing(sizes: list[int], width: int) -> list[list[int]]:
    """Items of these sizes (each at most `width`) in rows of `width`: the indices in each row.
    Longest first, each into the first row with room for it."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, room in enumerate(free) if room >= sizes[i]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= sizes[i]
    return rows


def pack_rows(sequences: list[tuple[np.ndarray, np.ndarray]], width: int) -> list[list[int]]:
    """Which sequences share each row of `width` positions (their indices), first-fit-decreasing
    on the positions each takes: n - 1 for n tokens, at most `width`."""
    return first_fit_decreasing([min(len(ids) - 1, width) for ids, _ in sequences], width)


def pack_sequences(sequences: list[tuple[np.ndarray, np.ndarray]], width: int, pad_id: int,
                   min_rows: int = 0) -> dict[str, torch.Tensor]:
    """Whole sequences laid into the rows `pack_rows` finds (at least `min_rows`, the rest padding).

    A sequence of n tokens takes n - 1 positions (inputs ids[:-1], targets ids[1:] where the mask
    is set); one longer than the row keeps its newest width + 1 tokens. "segments" numbers the
    sequence each position belongs to (its index in `sequences`; -1 on padding): the model then
    lets a position attend only within its own sequence, with positions counted from its start,
    so a sequence scores what it would alone, without the padding a row per sequence would need.
    """
    import torch

    pieces = [(ids[-(width + 1):], mask[-(width + 1):]) for ids, mask in sequences]
    rows = pack_rows(sequences, width)
    shape = (max(len(rows), min_rows), width)
    ids = np.full(shape, pad_id, dtype=np.int64)  # numpy: cheap slices between GPU steps
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            seq, mask = pieces[i]
            n = len(seq) - 1
            ids[r, at:at + n] = seq[:-1]
            labels[r, at:at + n] = np.where(mask[1:], seq[1:], IGNORE_INDEX)
            segments[r, at:at + n] = i
            at += n
    segments = torch.from_numpy(segments)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "segments": segments,
            "padding": segments < 0}


def mixed_batches(*sources: Iterable[dict]) -> Iterator[dict[str, torch.Tensor]]:
    """Concatenate the rows of one batch from each source into one batch (e.g. chats + pretraining
    text); a source without padding (packed text) gets an all-False padding mask."""
    import torch

    for parts in zip(*sources):
        batch = {key: torch.cat([p[key] for p in parts]) for key in ("input_ids", "labels")}
        if any("padding" in p for p in parts):
            batch["padding"] = torch.cat([p.get("padding", torch.zeros(p["input_ids"].shape, dtype=torch.bool))
                                          for p in parts])
        yield batch
