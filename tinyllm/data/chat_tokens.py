"""Encoded chats on disk: the encode_chats stage encodes the SFT conversations once, and sft and
lora memory-map them.

Encoding was the longest part of a chat stage's start-up on a real SFT set: 200,000 conversations of
MiniMind's lengths (37M tokens, 129 MB of JSON) took 30-33 s on 2 cores, and sft, lora's replay and
every process under torchrun did it again (reports/gpu_speed.md, "Start-up on the host"). A set is
a folder:

    ids.npy       int32: every conversation's token ids, end to end
    mask.npy      bool: which of them carry loss
    offsets.npy   int64: conversation i is ids[offsets[i]:offsets[i + 1]]
    meta.json     counts, a digest of the three arrays, and the tokenizer and system prompt used

    write_chat_set(Path("artifacts/chat_tokens/sft_single"), examples, tok, system_prompt)
    examples = load_chats([Path("artifacts/chat_tokens/sft_single")], tok, system_prompt)  # or .jsonl files
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tinyllm.data.chat import encode_conversations, read_conversations
from tinyllm.errors import DataError
from tinyllm.folders import replaced_folder

ARRAYS = ("ids", "mask", "offsets")
META = "meta.json"


def tokenizer_digest(tok: Tokenizer) -> str:
    """Names the tokenizer a set was encoded with: ids from another one would train on garbage."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def write_chat_set(out: Path, examples: list[tuple[np.ndarray, np.ndarray]], tok: Tokenizer,
                   system_prompt: str | None) -> dict:
    """Save encoded conversations as a set folder; returns its meta. An existing set is replaced
    whole (`replaced_folder`), not rewritten in place under a process that has its files mapped."""
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in examples], out=offsets[1:])
    arrays = {"ids": np.empty(offsets[-1], dtype=np.int32), "mask": np.empty(offsets[-1], dtype=bool),
              "offsets": offsets}
    for (ids, mask), start, end in zip(examples, offsets[:-1], offsets[1:]):  # no int64 copy of the whole set
        arrays["ids"][start:end], arrays["mask"][start:end] = ids, mask
    digest = hashlib.sha256()
    for name in ARRAYS:
        digest.update(arrays[name].tobytes())
    meta = {"conversations": len(examples), "tokens": int(offsets[-1]), "labelled": int(arrays["mask"].sum()),
            "sha256": digest.hexdigest(), "tokenizer": tokenizer_digest(tok), "system_prompt": system_prompt or None}
    with replaced_folder(out) as tmp:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def read_chat_set(folder: Path, tok: Tokenizer, system_prompt: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """A set's conversations as (ids, mask) views of its memory-mapped arrays; refused when it was
    encoded with another tokenizer or system prompt than the reader's."""
    meta_file = folder / META
    if not meta_file.exists():
        raise FileNotFoundError(f"{folder}: no encoded chats here (run `dvc repro encode_chats`)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta["tokenizer"] != tokenizer_digest(tok):
        raise DataError(f"{folder}: encoded with another tokenizer than the model's (run `dvc repro encode_chats`)")
    if meta["system_prompt"] != (system_prompt or None):  # encode_conversations adds no empty system prompt
        raise DataError(f"{folder}: encoded with system prompt {meta['system_prompt']!r}, not sft.system_prompt="
                        f"{system_prompt!r} (run `dvc repro encode_chats`)")
    # plain ndarray views of the maps: a memmap slice costs more to make, and 1M of them add up
    ids, mask = (np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r")) for name in ("ids", "mask"))
    offsets = np.load(folder / "offsets.npy").tolist()
    if not (len(ids) == len(mask) == offsets[-1] == meta["tokens"]) or len(offsets) != meta["conversations"] + 1:
        raise DataError(f"{folder}: its arrays do not match its meta.json (run `dvc repro encode_chats`)")
    return [(ids[start:end], mask[start:end]) for start, end in itertools.pairwise(offsets)]


def load_chats(sources: list[Path], tok: Tokenizer, system_prompt: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoded conversations from each source: a set folder (`write_chat_set`) as it is, or a
    .jsonl file of {"conversations": [...]} records, encoded here."""
    examples = []
    for source in sources:
        examples += (encode_conversations(tok, read_conversations([source]), system_prompt)
                     if source.suffix == ".jsonl" else read_chat_set(source, tok, system_prompt))
    return examples


def content_files(sources: list[Path]) -> list[Path]:
    """The files that stand for each source's content (a set's meta.json holds its arrays' digest),
    for a resume fingerprint."""
    return [source if source.suffix == ".jsonl" else source / META for source in sources]


def encode_chat_files(files: list[Path], tok: Tokenizer, system_prompt: str | None, out_dir: Path) -> dict:
    """Each .jsonl file of conversations as a set folder of the same name under `out_dir`; the sets' metas."""
    return {file.stem: write_chat_set(out_dir / file.stem, load_chats([file], tok, system_prompt), tok, system_prompt)
            for file in files}
