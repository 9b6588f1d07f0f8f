"""Verifiable rewards: does a reply give the right answer? A rule a program can check.

The grpo stage rewards each sampled reply with `score` (1.0 right, 0.0 anything else, malformed
replies included), and eval's `arith_heldout` / `arith_pass8` count right answers with the same
rule, so what RL is paid for is exactly what the metric measures.

    score("12加7等于19。", {"answer": "19", "kind": "arithmetic"})  # 1.0
"""

from __future__ import annotations

import re

ANSWER_AFTER = re.compile(r"(?:等于|equals|is|=)\s*(\d+)", re.IGNORECASE)
NUMBER = re.compile(r"\d+")


def final_number(reply: str) -> int | None:
    """The number an arithmetic reply answers with: the one after the last 等于 / equals / is / =
    ("12加7等于19。" → 19, "12 plus 7 equals 19." → 19), else the last number in it ("答案：19"
    → 19); None when the reply has no number. Restating the problem ("12加7") never counts as
    the answer, because the result comes after it."""
    after = ANSWER_AFTER.findall(reply)
    if after:
        return int(after[-1])
    numbers = NUMBER.findall(reply)
    return int(numbers[-1]) if numbers else None


def is_correct(reply: str, item: dict) -> bool:
    """Arithmetic items (kind "arithmetic"): the reply's final number equals the answer. Fact
    items: the reply contains the answer (eval's rule for chat QA)."""
    if item.get("kind") == "arithmetic":
        return final_number(reply) == int(item["answer"])
    return bool(item["answer"]) and item["answer"] in reply


def score(reply: str, item: dict) -> float:
    """The reward of one reply: 1.0 when `is_correct`, else 0.0."""
    return float(is_correct(reply, item))
