"""Token shards on disk and packed training batches read from them.

`tokenize_corpus` streams a JSON Lines corpus through the tokenizer in parallel batches and
appends each document, followed by <|endoftext|>, to flat uint16 (uint32 for big vocabularies)
shard files of the train or val split. `index.json` lists the shards. Memory stays flat: only
one batch of documents is held at a time.

`PackedBatches` cuts the concatenated token stream into windows of seq_len+1 tokens, so every
position is a real token (no padding), and serves them in a seeded shuffled order per epoch.

    tokenize_corpus(Path("artifacts/data/pretrain.jsonl"), tok, cfg, seed=1, out_dir=Path("artifacts/tokens"))
    batches = PackedBatches(TokenStream(Path("artifacts/tokens"), "train"), batch_size=16, seq_len=128, seed=1)
    batch = next(iter(batches))   # {"input_ids": (16, 128), "labels": (16, 128)}
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from tinyllm.config import TokenizeConfig
from tinyllm.data.jsonl import read_jsonl, validate_pretrain
from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.errors import DataError
from tinyllm.folders import replaced_folder

if TYPE_CHECKING:
    import torch  # imported where batches are made: the tokenize stage runs without it (chat.py)

SPLITS = ("train", "val")


class _ShardWriter:
    """Appends token arrays to numbered shard files of one split."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.n_docs = 0
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        if self._file is None or self.shards[-1]["n_tokens"] >= self.shard_tokens:
            self._open_next()
        self._file.write(ids.astype(self.dtype).tobytes())
        self.shards[-1]["n_tokens"] += len(ids)
        self.n_docs += 1

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.shards.append({"file": name, "n_tokens": 0})
        self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 (open across calls; close() ends it)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {"shards": self.shards, "n_tokens": sum(s["n_tokens"] for s in self.shards), "n_docs": self.n_docs}


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_corpus(corpus: Path, tok: Tokenizer, cfg: TokenizeConfig, seed: int, out_dir: Path) -> dict:
    """Encode `corpus` (`{"text"}` JSON Lines) into train/val shards under `out_dir`.

    Each document goes to val with probability `cfg.val_fraction` (seeded), so the split is
    by document and the same for the same corpus and seed. The folder is built beside its place
    and moved in at the end (`replaced_folder`): a failure leaves the previous tokens untouched.

    Returns:
        The index (also written to `out_dir/index.json`).
    """
    eot = special_id(tok, ENDOFTEXT)
    vocab_size = tok.get_vocab_size()
    with replaced_folder(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, token_dtype(vocab_size), cfg.shard_tokens) for s in SPLITS}
        _encode_documents(corpus, tok, cfg, seed, eot, writers)
        index = _index(vocab_size, eot, writers)
        for split in SPLITS:
            if index["splits"][split]["n_tokens"] == 0:
                raise DataError(
                    f"{corpus}: the {split} split got no documents; add documents or change tokenize.val_fraction"
                )
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return index


def random_tokens(out_dir: Path, vocab_size: int, n_tokens: dict[str, int], seed: int = 0) -> Path:
    """A token folder as `tokenize_corpus` writes it, of `n_tokens[split]` uniformly random ids per
    split (one document each), for a run that needs batches of the right shape and not real text:
    pretraining's step compiled ahead (stages/compile_ahead.py)."""
    out_dir.mkdir(parents=True)
    generator = np.random.default_rng(seed)
    writers = {s: _ShardWriter(out_dir, s, token_dtype(vocab_size), n_tokens[s]) for s in SPLITS}
    for split, writer in writers.items():
        writer.write(generator.integers(0, vocab_size, n_tokens[split]))
        writer.close()
    (out_dir / "index.json").write_text(json.dumps(_index(vocab_size, None, writers), indent=2))
    return out_dir


def token_dtype(vocab_size: int) -> np.dtype:
    """The shards' integer type: 2 bytes a token while every id fits."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _index(vocab_size: int, eot: int | None, writers: dict[str, _ShardWriter]) -> dict:
    """index.json's content: the shards of each split, and what reading them needs."""
    return {"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size, "endoftext_id": eot,
            "splits": {s: w.summary() for s, w in writers.items()}}


def _encode_documents(corpus: Path, tok: Tokenizer, cfg: TokenizeConfig, seed: int, eot: int,
                      writers: dict[str, _ShardWriter]) -> None:
    """Every document of `corpus`, encoded and ended with <|endoftext|>, into a seeded random split's
    writer; the writers are closed at the end, whether it ends or fails."""
    rng = random.Random(seed)
    texts = (rec["text"] for rec in read_jsonl(corpus, validate_pretrain))
    tok.encode_special_tokens = True  # "<|im_end|>" typed in a document is text, not a control token
    try:
        for batch in _batched(texts, cfg.batch_docs):
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                split = "val" if rng.random() < cfg.val_fraction else "train"
                writers[split].write(np.append(np.asarray(enc.ids, dtype=np.int64), eot))
    finally:
        tok.encode_special_tokens = False
        for w in writers.values():
            w.close()


class TokenStream:
    """One split's shards as a single read-only token sequence (memory-mapped)."""

    def __init__(self, token_dir: Path, split: str):
        index_file = Path(token_dir) / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file}: no token index (run `dvc repro tokenize`)")
        self.index = json.loads(index_file.read_text())
        info = self.index["splits"][split]
        self.shards = [
            np.memmap(Path(token_dir) / s["file"], dtype=self.index["dtype"], mode="r") for s in info["shards"]
        ]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, stitched across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside stream of {len(self)} tokens")
        parts, pos, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self.starts[shard]
            hi = min(end, self.starts[shard + 1]) - self.starts[shard]
            parts.append(self.shards[shard][lo:hi])
            pos += hi - lo
            shard += 1
        return np.concatenate(parts).astype(np.int64)


class PackedBatches:
    """Endless packed batches: window i covers tokens [i·T, i·T + T] (T+1 tokens, one overlap).

    Windows are dealt out in a seeded shuffled order per epoch; with `world_size` > 1 each rank
    takes every world_size-th window of that order, so ranks never see the same window.
    `state()`/`load_state()` give the position, for an exact resume.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < batch_size * world_size:
            raise DataError(
                f"only {len(stream)} tokens: fewer than batch_size×world_size={batch_size * world_size} windows "
                f"of seq_len {seq_len}; use more data or a smaller batch/sequence"
            )
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.cursor = 0, 0  # cursor counts global windows already dealt this epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        order = self._order()
        step = self.batch_size * self.world_size
        while True:
            if self.cursor + step > self.n_windows:  # drop the ragged tail, start a new epoch
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            mine = order[self.cursor + self.rank : self.cursor + step : self.world_size]
            self.cursor += step
            rows = np.stack([self.stream.window(int(w) * self.seq_len, self.seq_len + 1) for w in mine])
            rows = torch.from_numpy(rows)
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
