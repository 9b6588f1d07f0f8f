"""Verifiable rewards: does a reply give the right answer? A rule a program can check.

The grpo stage rewards each sampled reply with `score` (1.0 right, 0.0 anything else, malformed
replies included), and eval's `arith_heldout` / `arith_pass8` count right answers with the same
rule, so what RL is paid for is exactly what the metric measures.

    score("12加7等于19。", {"answer": "19", "kind": "arithmetic"})  # 1.0
"""

from __future__ import annotations

import re

from tinyllm.data.chat import ROLES, is_message

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
    """Items of kind "arithmetic" (the world's sums, a user's GSM8K-style problems): the reply's
    final number equals the answer. Other items: the reply contains the answer (eval's rule for
    chat QA)."""
    if item.get("kind") == "arithmetic":
        return final_number(reply) == int(item["answer"])
    return bool(item["answer"]) and item["answer"] in reply


def score(reply: str, item: dict) -> float:
    """The reward of one reply: 1.0 when `is_correct`, else 0.0."""
    return float(is_correct(reply, item))


def validate_prompt(obj) -> str | None:
    """What is wrong with a prompt line ({"messages": [..., user turn], "answer": str, "kind"?}),
    or None. An "arithmetic" item's answer must be a whole number."""
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages or not all(map(is_message, messages)):
        return f'needs "messages": a non-empty list of {{"role": one of {ROLES}, "content": string}}'
    if messages[-1].get("role") != "user" or not messages[-1]["content"].strip():
        return "the last message must be the user's, with text (the policy writes the reply)"
    if not isinstance(obj.get("answer"), str) or not obj["answer"].strip():
        return 'needs "answer": the non-empty string a right reply gives'
    if obj.get("kind") == "arithmetic" and not NUMBER.fullmatch(obj["answer"]):
        return f'kind "arithmetic" needs a whole-number "answer", got {obj["answer"]!r}'
    return None
