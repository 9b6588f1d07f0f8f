"""How long the training stages take to turn chat files into token ids (issue 22: start-up).

sft, lora (its replay set), dpo and eval encode their conversations before the first step. Until
2026-12-05 `encode_conversation` called the tokenizer once per piece (role header, content, newline),
three calls a message from Python. `encode_conversations` encodes the fixed pieces once and every
content in one `encode_batch` call, which runs in Rust on every core. This times both on the same
conversations, in one process, alternating, and checks that they give the same ids and masks.

    python reports/bench/data/encode_chats.py artifacts/tokenizer artifacts/data/chat/sft_*.jsonl
    python reports/bench/data/encode_chats.py TOKENIZER FILES... --out reports/bench/data/encode_chats_NAME.md

The committed tables: the GPU preset world's SFT chats (`tinyllm preset gpu`'s world prepared in a
scratch copy under /tmp) and 50,000 MiniMind-shaped ones (`minimind_shaped.py --conversations 50000
--write /tmp/mm` from that world).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from tinyllm.data.chat import encode_conversations, read_conversations
from tinyllm.data.tokenizer import IM_END, IM_START, load_tokenizer


def one_call_per_piece(tok, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The encoding as it was: the tokenizer called for every piece of the ChatML rendering."""
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        for text, learn in ((f"{IM_START}{m['role']}\n", False), (f"{m['content']}{IM_END}", m["role"] == "assistant"),
                            ("\n", False)):
            piece = tok.encode(text, add_special_tokens=False).ids
            ids += piece
            mask += [learn] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("files", type=Path, nargs="+", help="chat JSONL files ({'conversations': [...]} lines)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    conversations = read_conversations(args.files)
    per_piece, batched = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        before = [one_call_per_piece(tok, c) for c in conversations]
        per_piece.append(time.perf_counter() - start)
        start = time.perf_counter()
        now = encode_conversations(tok, conversations)
        batched.append(time.perf_counter() - start)
    same = all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(before, now, strict=True))
    tokens = sum(len(ids) for ids, _ in now)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"{machine}; {', '.join(map(str, args.files))}; best of {args.repeats}",
        "",
        ("| conversations | messages | tokens | one call per piece (s) | `encode_conversations` (s) | speed-up "
        "| same ids and masks |"),
        "|---|---|---|---|---|---|---|",
        (f"| {len(conversations):,} | {sum(map(len, conversations)):,} | {tokens:,} | {min(per_piece):.2f} "
        f"| {min(batched):.2f} | {min(per_piece) / min(batched):.1f}× | {'yes' if same else 'NO'} |"),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
