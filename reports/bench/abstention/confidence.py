"""How well could a chat model tell the people it knows from people who do not exist? → stdout.

    python reports/bench/abstention/confidence.py artifacts/lora     # the model DPO starts from

A model that abstains on exactly the unknown people must sense, from the name alone, whether it
knows the person. Its own confidence is a proxy for that sense: for each question (eval_qa's seen
and held-out people, eval_unknown's people who are not in the world) this script takes the
model's greedy reply and its least likely token (the guessed value, when it guesses). Then:
- AUC: the chance that a known person's reply is more confident than an unknown one's;
- the best threshold rule "abstain when the least likely token is below t": at the t where it
  abstains on 85% of the unknown people, the share of known people it would wrongly abstain on.
If even that rule cannot reach the issue's targets (≥ 0.85 unknown, ≤ 0.05 known), DPO would have
to teach the model more than it knows. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tinyllm.data.chat import encode_conversation
from tinyllm.eval.chat_eval import chat_replies
from tinyllm.infer.chat import load_chat_model

EVAL = Path("artifacts/data/eval")


def least_likely_token(model, tok, items: list[dict]) -> list[float]:
    """Per item: the lowest log-prob of any token of the model's own greedy reply."""
    conversations = [item["messages"] for item in items]
    replies = chat_replies(model, tok, conversations, max_new_tokens=24)
    scores = []
    for messages, reply in zip(conversations, replies):
        ids, mask = encode_conversation(tok, messages + [{"role": "assistant", "content": reply}])
        x = torch.tensor(ids)[None]
        with torch.no_grad():
            logps = torch.log_softmax(model(x[:, :-1]).logits[0].float(), -1)
        token_logps = logps.gather(-1, x[0, 1:, None])[:, 0][torch.tensor(mask[1:], dtype=torch.bool)]
        scores.append(float(token_logps.min()))
    return scores


def auc(known: list[float], unknown: list[float]) -> float:
    return sum((k > u) + 0.5 * (k == u) for k in known for u in unknown) / (len(known) * len(unknown))


def false_abstain_at(known: list[float], unknown: list[float], unknown_abstain: float = 0.85) -> float:
    """Abstain below the threshold that catches `unknown_abstain` of the unknown people; the share
    of known people that rule abstains on."""
    threshold = sorted(unknown)[max(round(unknown_abstain * len(unknown)) - 1, 0)]
    return sum(k <= threshold for k in known) / len(known)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    model, tok, _ = load_chat_model(args.checkpoint)
    qa = [json.loads(line) for line in (EVAL / "eval_qa.jsonl").open()]
    unknown = least_likely_token(model, tok, [json.loads(line) for line in (EVAL / "eval_unknown.jsonl").open()])
    print(f"{args.checkpoint}: least likely token of the greedy reply; unknown people: "
          f"{len(unknown)} questions, mean log-prob {sum(unknown) / len(unknown):.2f}\n")
    print("| known people | questions | mean log-prob | AUC vs unknown | false abstentions at 85% unknown |")
    print("|---|---|---|---|---|")
    for split in ("seen", "heldout"):
        known = least_likely_token(model, tok, [item for item in qa if item["split"] == split])
        print(f"| {split} | {len(known)} | {sum(known) / len(known):.2f} | {auc(known, unknown):.3f} "
              f"| {false_abstain_at(known, unknown):.1%} |")


if __name__ == "__main__":
    main()
