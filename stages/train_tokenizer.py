"""Stage train_tokenizer: byte-level BPE on the corpus and the chat data → artifacts/tokenizer/.

Chat conversations are rendered with the ChatML template before training, so role headers
("assistant") and question words become tokens of their own instead of byte fragments.
"""

from pathlib import Path

from tinyllm.data.chat import validate_conversation
from tinyllm.data.jsonl import read_jsonl, validate_pretrain
from tinyllm.data.tokenizer import render_chat, save_tokenizer, train_tokenizer
from tinyllm.stage import stage_main

DATA = Path("artifacts/data")
CHAT_FILES = ("sft_single.jsonl", "sft_multi.jsonl", "identity.jsonl")


def texts():
    yield from (rec["text"] for rec in read_jsonl(DATA / "pretrain.jsonl", validate_pretrain))
    for name in CHAT_FILES:
        yield from (render_chat(rec["conversations"]) for rec in read_jsonl(DATA / name, validate_conversation))


@stage_main
def main(params):
    save_tokenizer(train_tokenizer(texts(), params.tokenizer), Path("artifacts/tokenizer"))


if __name__ == "__main__":
    main()
