"""Stage tokenize: corpus → uint16 train/val shards + index.json in artifacts/tokens/."""

from pathlib import Path

from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.data.tokens import tokenize_corpus
from tinyllm.stage import stage_main, write_json


@stage_main
def main(params):
    index = tokenize_corpus(Path("artifacts/data/pretrain.jsonl"), load_tokenizer(Path("artifacts/tokenizer")),
                            params.tokenize, params.seed, Path("artifacts/tokens"))
    counts = {split: {k: v[k] for k in ("n_tokens", "n_docs")} for split, v in index["splits"].items()}
    write_json(Path("reports/metrics/tokens.json"), {"vocab_size": index["vocab_size"], **counts})


if __name__ == "__main__":
    main()
