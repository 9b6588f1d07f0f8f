"""SFT conversations of MiniMind's lengths, from the world, and how much padding our SFT batches
carry on them (issue 22: "a table for all stages ... on chat data of realistic lengths").

    python reports/bench/gpu/minimind_shaped.py                      # the padding table, here
    python reports/bench/gpu/minimind_shaped.py --write data/long    # + a corpus for data.source files

The world's own SFT data is short question-and-answer (a few dozen tokens), so 32 × 512 rows
pack many conversations each. MiniMind's sft_mini_512 keeps conversations under 512 tokens, most of
them hundreds long. These conversations ask about one to six people of the world at a time
("介绍一下A和B。", "Tell me about A and B."); the reply gives every fact of each, and a third of them
have a follow-up turn. Their token lengths are printed beside the padding, so the shape is
measured, not assumed. `--write DIR` saves them as MiniMind-format lines (`DIR/sft.jsonl`), beside
the world's own pretraining text, identity conversations, preference pairs and grpo prompts, and
prints the `dvc exp run` flags that train on that folder (`data.source: files`).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import numpy as np

from tinyllm.data.chat import ChatBatches, encode_conversations, read_conversations
from tinyllm.data.chat_data import ATTRIBUTES, answer_sentence
from tinyllm.data.jsonl import write_jsonl
from tinyllm.data.tokenizer import ENDOFTEXT, load_tokenizer
from tinyllm.data.world import load_world

ASK = {"zh": ("介绍一下{names}。", "{names}都是什么样的人？"), "en": ("Tell me about {names}.", "Who are {names}?")}
AND = {"zh": "和", "en": " and "}
MORE = {"zh": ("再说说{name}。", "还有{name}呢？"), "en": ("And {name} again?", "Say more about {name}.")}


def long_conversation(people, rng: random.Random) -> list[dict]:
    lang = "en" if rng.random() < 0.3 else "zh"
    group = rng.sample(people, rng.choice((1, 1, 2, 2, 3, 4, 5, 6)))
    names = [getattr(p.name, lang) for p in group]
    ask = rng.choice(ASK[lang]).format(names=AND[lang].join(names))
    sep = "" if lang == "zh" else " "
    reply = "\n\n".join(sep.join(answer_sentence(p, a, lang) for a in ATTRIBUTES) for p in group)
    messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]
    if rng.random() < 1 / 3:
        p = rng.choice(group)
        messages += [{"role": "user", "content": rng.choice(MORE[lang]).format(name=getattr(p.name, lang))},
                     {"role": "assistant", "content": sep.join(answer_sentence(p, a, lang) for a in ATTRIBUTES)}]
    return messages


def padding(examples, batch_size: int, seq_len: int, pad_id: int, batches: int) -> tuple[float, float]:
    """(padding share of the positions, host milliseconds per batch) over `batches` batches."""
    stream = iter(ChatBatches(examples, batch_size, seq_len, seed=0, pad_id=pad_id))
    start, padded, total = time.perf_counter(), 0, 0
    for _ in range(batches):
        batch = next(stream)
        padded += int(batch["padding"].sum())
        total += batch["input_ids"].numel()
    return padded / total, 1000 * (time.perf_counter() - start) / batches


WORLD_FILES = {"pretrain": "pretrain.jsonl", "identity": "chat/identity.jsonl", "dpo": "dpo.jsonl",
               "grpo": "grpo.jsonl"}
"""The prepared world's files a corpus of long conversations keeps, by the data.* list they go in."""


def write_corpus(out: Path, conversations: list[list[dict]], world_data: Path) -> None:
    """`out`/sft.jsonl (the conversations) and copies of the world's other files, then the flags."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "sft.jsonl", ({"conversations": c} for c in conversations))
    flags = ["-S data.source=files", f"-S 'data.sft=[{out / 'sft.jsonl'}]'"]
    for kind, name in WORLD_FILES.items():
        shutil.copy2(world_data / name, out / Path(name).name)
        flags.append(f"-S 'data.{kind}=[{out / Path(name).name}]'")
    print("dvc exp run " + " ".join(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"), help="a prepared world")
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizer"))
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--write", type=Path, help="save the conversations here as sft.jsonl")
    args = parser.parse_args()
    world, tok = load_world(args.data / "world.json"), load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    long = [long_conversation(world.people, rng) for _ in range(args.conversations)]
    if args.write:
        write_corpus(args.write, long, args.data)
    world_sft = read_conversations([args.data / "chat/sft_single.jsonl", args.data / "chat/sft_multi.jsonl"])
    pad = tok.token_to_id(ENDOFTEXT)
    print(f"| SFT data | conversations | tokens p10 / p50 / p90 / max | padding share at {args.batch_size} × "
          f"{args.seq_len} | host ms per batch |")
    print("|---|---|---|---|---|")
    for name, convs in (("the world's (default)", world_sft), ("MiniMind-shaped", long)):
        examples = encode_conversations(tok, convs)
        lengths = np.array([len(ids) for ids, _ in examples])
        share, ms = padding(examples, args.batch_size, args.seq_len, pad, args.batches)
        quantiles = " / ".join(str(int(q)) for q in np.percentile(lengths, [10, 50, 90, 100]))
        print(f"| {name} | {len(convs)} | {quantiles} | {share:.1%} | {ms:.1f} |")


if __name__ == "__main__":
    main()
