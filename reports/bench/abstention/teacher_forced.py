"""The abstention ceiling when the reply keeps the asked name (compare confidence.py, which reads the
model's own reply, where an unknown name is often swapped for a known one).

    python reports/bench/abstention/teacher_forced.py artifacts/lora

For each question (eval_qa's seen and held-out people, eval_unknown's people who are not in the
world) the reply is written up to the value with the name that was asked ("Cao Fang's favourite
colour is"), and the model's top-1 probability at the value is its confidence. Printed: the mean
per group, the AUC against the unknown people, and the share of known people a rule "abstain
below t" would wrongly abstain on at the t where it abstains on 85% of the unknown people.
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tinyllm.data.chat import encode_conversation
from tinyllm.data.chat_data import answer_sentence, attribute_value
from tinyllm.data.world import ATTRIBUTES, load_world
from tinyllm.infer.chat import load_chat_model

DATA = Path("artifacts/data")


def value_confidence(model, tok, item: dict, person) -> float:
    """Top-1 probability at the value, after the canonical answer written up to it."""
    lang = item.get("lang", "zh")
    sentence = answer_sentence(person, item["kind"], lang)
    prefix = sentence[:sentence.index(attribute_value(person, item["kind"], lang))].rstrip(" ")
    ids, _ = encode_conversation(tok, item["messages"] + [{"role": "assistant", "content": prefix}])
    ids, own = list(ids), tok.encode(prefix, add_special_tokens=False).ids
    end = max(i for i in range(len(ids) - len(own) + 1) if ids[i:i + len(own)] == own) + len(own)
    with torch.no_grad():
        logits = model(torch.tensor(ids[:end])[None]).logits[0, -1].float()
    return torch.softmax(logits, -1).max().item()


def name_confidence(model, tok, item: dict, person) -> float:
    """Log-probability of the canonical reply's start up to the first token after the asked name
    (the model's sense of the whole name: an unknown one is often swapped for a known name that
    shares its surname, or continued into one, 孙红 → 孙红梅)."""
    lang = item.get("lang", "zh")
    sentence, name = answer_sentence(person, item["kind"], lang), getattr(person.name, lang)
    ids, _ = encode_conversation(tok, item["messages"] + [{"role": "assistant", "content": sentence}])
    ids, own = list(ids), tok.encode(sentence, add_special_tokens=False).ids
    start = max(i for i in range(len(ids) - len(own) + 1) if ids[i:i + len(own)] == own)
    n = len(tok.encode(name, add_special_tokens=False).ids) + 1
    x = torch.tensor(ids[:start + n])[None]
    with torch.no_grad():
        logps = torch.log_softmax(model(x[:, :-1]).logits[0].float(), -1)
    return logps[-n:].gather(-1, x[0, -n:, None]).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--at", choices=["value", "name"], default="value",
                        help="value: top-1 probability at the value; name: log-prob of the asked name")
    args = parser.parse_args()
    model, tok, _ = load_chat_model(args.checkpoint)
    world = load_world(DATA / "world.json")
    people = [*world.people, *world.unknown]

    def asked(item: dict):
        """The person the question names (the longest name found, so 李明 does not take 李明轩)."""
        lang, question = item.get("lang", "zh"), item["messages"][-1]["content"]
        return max((p for p in people if getattr(p.name, lang) in question), key=lambda p: len(getattr(p.name, lang)))

    score = value_confidence if args.at == "value" else name_confidence
    groups: dict[str, list[float]] = {"seen": [], "heldout": [], "unknown": []}
    for name in ("eval_qa.jsonl", "eval_unknown.jsonl"):
        for line in (DATA / "eval" / name).open():
            item = json.loads(line)
            if item["kind"] in ATTRIBUTES:
                groups[item["split"]].append(score(model, tok, item, asked(item)))
    unknown = sorted(groups.pop("unknown"))
    threshold = unknown[int(0.85 * len(unknown))]
    print(f"{args.checkpoint}: unknown people {len(unknown)} questions, mean top-1 probability "
          f"{statistics.mean(unknown):.3f}")
    print("| known people | questions | mean top-1 probability | AUC vs unknown | false abstentions at 85% unknown |")
    print("|---|---|---|---|---|")
    for group, scores in groups.items():
        auc = sum((a > b) + 0.5 * (a == b) for a in scores for b in unknown) / (len(scores) * len(unknown))
        wrong = sum(a <= threshold for a in scores) / len(scores)
        print(f"| {group} | {len(scores)} | {statistics.mean(scores):.3f} | {auc:.3f} | {wrong:.1%} |")


if __name__ == "__main__":
    main()
