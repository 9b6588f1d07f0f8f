"""Stage train_tokenizer: byte-level BPE on the pretraining corpus → artifacts/tokenizer/."""

from pathlib import Path

from tinyllm.data.jsonl import read_jsonl, validate_pretrain
from tinyllm.data.tokenizer import save_tokenizer, train_tokenizer
from tinyllm.stage import stage_main


@stage_main
def main(params):
    texts = (rec["text"] for rec in read_jsonl(Path("artifacts/data/pretrain.jsonl"), validate_pretrain))
    save_tokenizer(train_tokenizer(texts, params.tokenizer), Path("artifacts/tokenizer"))


if __name__ == "__main__":
    main()
