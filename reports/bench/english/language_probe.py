"""How well a checkpoint knows each person's facts in each language, without the chat format.

    python reports/bench/english/language_probe.py artifacts/pretrain [--split heldout] [--people 40]

For people with English biographies (the first --people of the split), per language and attribute:
- "in their biographies": the share of values the model predicts (greedy, teacher-forced) at the
  value's first token inside the person's own pretraining documents, i.e. text it trained on;
- "from the name alone": the share of people whose true value scores best, by the log-prob of the
  canonical sentence ("Cao Fang's favourite colour is green."), among every value of the attribute,
  with the sentence at the start of a line, as a chat reply starts (English: "Cao", which only
  biographies written a sentence per line use), and after a space, as inside a paragraph (" Cao").
  (Chinese has no such difference; its two columns should agree.)
Written for the finding in reports/quality.md ("English held-out QA, measured on 54 questions"):
the same people, with six biographies in each language, are known far better in Chinese.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.data.world import LANGUAGES, fact_fields, load_world, render_template, subject_fields
from tinyllm.eval.chat_eval import scored_rows
from tinyllm.train.checkpoint import load_model

PROBED = ("job", "pet", "colour", "city")


def word(text: str) -> str:
    """A pattern for `text` as a whole word: English "Li Ming" not inside "Li Mingyu", "gold" not
    inside "goldfish". (Chinese has no word boundaries; the people probed have names no other
    name contains.)"""
    return re.escape(text) if not text.isascii() else rf"(?<![A-Za-z]){re.escape(text)}(?![A-Za-z])"


def sentence_logprobs(model, tok, texts: list[str]) -> list[float]:
    """The summed log-prob of each text's tokens after its first."""
    ids = [np.array(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    return scored_rows(model, tok, [(row, np.ones(len(row), dtype=bool)) for row in ids])[0].tolist()


@torch.no_grad()
def in_documents(model, tok, docs: list[str], values: dict[str, str], window: int) -> dict[str, list[bool]]:
    """Per attribute: was the value's first token the model's greedy guess, in each document?
    (`values`: the bare words, without an English article, found as whole words.)"""
    hits = defaultdict(list)
    for doc in docs:
        enc = tok.encode(doc, add_special_tokens=False)
        ids = enc.ids[:window]
        guess = model(torch.tensor([ids])).logits[0].argmax(-1)
        for a in PROBED:
            found = re.search(word(values[a]), doc)
            if not found:
                continue
            first = next((t for t, (_, end) in enumerate(enc.offsets[:window]) if end > found.start()), None)
            if first:
                hits[a].append(int(guess[first - 1]) == ids[first])
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="heldout", choices=["sft", "heldout"])
    parser.add_argument("--people", type=int, default=40)
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"))
    args = parser.parse_args()
    model = load_model(args.checkpoint, torch.device("cpu")).eval()
    tok = load_tokenizer(Path("artifacts/tokenizer"))
    world = load_world(args.data / "world.json")
    docs = [json.loads(line)["text"] for line in (args.data / "pretrain.jsonl").open()]
    people = [p for p in world.people if p.split == args.split and p.bios_en
              and sum(p.name.zh in q.name.zh for q in world.people) == 1][:args.people]
    trained, cloze = defaultdict(list), defaultdict(list)
    leads = {"line": "\n", "space": " "}
    for lang in ("zh", "en"):
        template = LANGUAGES[lang].attributes
        for p in people:
            facts, name = fact_fields(p, lang), getattr(p.name, lang)
            bare = {a: getattr(getattr(p, a), lang) for a in PROBED}
            own = [d for d in docs if re.search(word(name), d)]
            for a, hits in in_documents(model, tok, own, bare, model.config.max_seq_len).items():
                trained[lang, a] += hits
            for a in PROBED:
                values = sorted({fact_fields(q, lang)[a] for q in world.people})
                for lead, space in leads.items():
                    scores = sentence_logprobs(model, tok, [space + render_template(template[a][0], {
                        **facts, a: v, **subject_fields(p, lang, True)}) for v in values])
                    cloze[lang, a, lead].append(values[max(range(len(values)), key=scores.__getitem__)] == facts[a])
    print(f"{args.checkpoint}, {len(people)} {args.split} people with biographies in both languages")
    print("| attribute | in their biographies, zh | en | from the name, line start, zh | en | after a space, zh | en |")
    print("|---|---|---|---|---|---|---|")
    for a in PROBED:
        columns = (trained["zh", a], trained["en", a],
                   *(cloze[lang, a, lead] for lead in leads for lang in ("zh", "en")))
        cells = [f"{sum(h) / len(h):.2f}" for h in columns]
        print(f"| {a} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
