"""Stage train_tokenizer: byte-level BPE on the corpus and the chat data → artifacts/tokenizer/.

Chat conversations are rendered with the ChatML template before training, so role headers
("assistant") and question words become tokens of their own instead of byte fragments. With
`tokenizer.max_corpus_bytes`, every k-th document is used, so a big corpus is sampled evenly
(MiniMind trains its tokenizer on a slice of its data for the same reason).
"""

import itertools
import logging
import math
from pathlib import Path

from tinyllm import pretrain_ahead
from tinyllm.data.chat import validate_conversation
from tinyllm.data.jsonl import read_jsonl, validate_pretrain
from tinyllm.data.tokenizer import render_chat, save_tokenizer, train_tokenizer
from tinyllm.stage import stage_main

DATA = Path("artifacts/data")
OUT = Path("artifacts/tokenizer")
CHAT_FILES = ("chat/sft_single.jsonl", "chat/sft_multi.jsonl", "chat/identity.jsonl")
log = logging.getLogger(__name__)


def texts(max_bytes: int):
    total = sum((DATA / name).stat().st_size for name in ("pretrain.jsonl", *CHAT_FILES))
    stride = math.ceil(total / max_bytes) if max_bytes else 1
    if stride > 1:
        log.info("training the tokenizer on one document in every %d (~%.1f of %.1f MB)", stride,
                 total / stride / 1e6, total / 1e6)
    docs = itertools.chain(
        (rec["text"] for rec in read_jsonl(DATA / "pretrain.jsonl", validate_pretrain)),
        *((render_chat(rec["conversations"]) for rec in read_jsonl(DATA / name, validate_conversation))
          for name in CHAT_FILES))
    return itertools.islice(docs, 0, None, stride)


@stage_main
def main(params):
    pretrain_ahead.start_on_a_gpu()  # where prepare did not rerun; pretraining's step compiles meanwhile
    save_tokenizer(train_tokenizer(texts(params.tokenizer.max_corpus_bytes), params.tokenizer), OUT)


if __name__ == "__main__":
    main()
