"""Stage encode_chats: the chat data as token ids and loss masks → artifacts/chat_tokens/, which sft
and lora memory-map instead of encoding it again each (tinyllm/data/chat_tokens.py)."""

from pathlib import Path

from tinyllm.data.chat_tokens import encode_chat_files
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.stage import stage_main, write_json


@stage_main
def main(params):
    metas = encode_chat_files(sorted(Path("artifacts/data/chat").glob("*.jsonl")),
                              load_tokenizer(Path("artifacts/tokenizer")), params.sft.system_prompt,
                              Path("artifacts/chat_tokens"))
    write_json(Path("reports/metrics/chat_tokens.json"),
               {name: {k: meta[k] for k in ("conversations", "tokens", "labelled")} for name, meta in metas.items()})


if __name__ == "__main__":
    main()
