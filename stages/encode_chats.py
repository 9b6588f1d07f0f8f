"""Stage encode_chats: the chat data as token ids and loss masks → artifacts/chat_tokens/, which sft
and lora memory-map instead of each encoding it again (tinyllm/data/chat_tokens.py)."""

from pathlib import Path

from tinyllm.data.chat_tokens import encode_chat_files
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.stage import stage_main, write_json

CHAT = Path("artifacts/data/chat")


@stage_main
def main(params):
    files = sorted(CHAT.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{CHAT}: no chat files to encode (run `dvc repro prepare`)")
    metas = encode_chat_files(files, load_tokenizer(Path("artifacts/tokenizer")), params.sft.system_prompt,
                              Path("artifacts/chat_tokens"))
    write_json(Path("reports/metrics/chat_tokens.json"),
               {name: {k: meta[k] for k in ("conversations", "tokens", "labelled")} for name, meta in metas.items()})


if __name__ == "__main__":
    main()
