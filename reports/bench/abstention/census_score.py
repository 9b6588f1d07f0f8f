"""Round seven of reports/abstention.md: after census lines in pretraining ("李明是这个世界里的人。",
"王芳不是这个世界里的人。"), does the model tell a person of the world from a name that is not one?

    git apply reports/bench/abstention/census.patch && dvc repro pretrain
    python reports/bench/abstention/census_score.py artifacts/pretrain doc   # or artifacts/lora chat

Scores log p(不 | name) (English: p(" not" | "<name> is")) at a line's start ("doc") or at the start
of a chat reply to a question about the name ("chat"), per group: people SFT asks about, held-out
people, the unknown names of the DPO pairs, census names that are not people (trained on), and
eval_unknown's names (never seen). AUC: how often a known person scores below an eval_unknown
name; "flagged": share of the group at or above the score that flags 85% of eval_unknown's names.
Needs the patch (World.absent). Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from tinyllm.data.chat import encode_conversation
from tinyllm.data.chat_data import UNKNOWN_DPO_PEOPLE
from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.data.world import load_world
from tinyllm.infer.chat import load_chat_model

MARK = {"zh": "不", "en": " not"}
"""The token that says "not a person", after the name (and, in English, after " is")."""
SUFFIX = {"zh": "", "en": " is"}


def not_a_person_logprob(model, tok, name: str, lang: str, where: str) -> float:
    """log p(MARK) after `name` + SUFFIX, at a document's start or at a chat reply's."""
    mark = tok.encode(MARK[lang], add_special_tokens=False).ids[0]
    own = tok.encode(name + SUFFIX[lang], add_special_tokens=False).ids
    if where == "doc":
        prefix = [special_id(tok, ENDOFTEXT), *own]
    else:
        question = f"{name}住在哪里？" if lang == "zh" else f"Where does {name} live?"
        ids, _ = encode_conversation(tok, [{"role": "user", "content": question},
                                           {"role": "assistant", "content": name + SUFFIX[lang]}])
        ids = list(ids)
        end = max(i for i in range(len(ids) - len(own) + 1) if ids[i:i + len(own)] == own) + len(own)
        prefix = ids[:end]
    with torch.no_grad():
        logits = model(torch.tensor(prefix)[None]).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[mark].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("where", choices=["doc", "chat"], nargs="?", default="doc")
    args = parser.parse_args()
    model, tok, _ = load_chat_model(args.checkpoint)
    world = load_world("artifacts/data/world.json")
    print("| lang | names | n | mean log p | AUC vs eval_unknown | flagged at 85% of eval_unknown |")
    print("|---|---|---|---|---|---|")
    for lang in ("zh", "en"):
        groups = {"sft people": [p.name for p in world.people if p.split == "sft"][:120],
                  "held-out people": [p.name for p in world.people if p.split == "heldout"],
                  "DPO unknown": [p.name for p in world.unknown[:60]],
                  "census (not people)": list(world.absent[:60]),
                  "eval_unknown": [p.name for p in world.unknown[UNKNOWN_DPO_PEOPLE:]]}
        scores = {g: [not_a_person_logprob(model, tok, getattr(n, lang), lang, args.where) for n in names]
                  for g, names in groups.items()}
        unknown = scores["eval_unknown"]
        threshold = sorted(unknown)[int(0.15 * len(unknown))]
        for group, s in scores.items():
            auc = sum((a < b) + 0.5 * (a == b) for a in s for b in unknown) / (len(s) * len(unknown))
            flagged = sum(a >= threshold for a in s) / len(s)
            print(f"| {lang} | {group} | {len(s)} | {statistics.mean(s):.2f} | {auc:.3f} | {flagged:.1%} |")


if __name__ == "__main__":
    main()
