"""What a chat model does: answers checked by substring, and preference accuracy.

Items come from `prepare`: `{"messages": [...ending with a user turn], "answer": "杭州", "split": ...}`
is right when the greedy reply contains the answer; a preference pair is right when the model
gives the chosen reply a higher log-probability than the rejected one.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from tokenizers import Tokenizer

from tinyllm.data.chat import collate, encode_conversation
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, render_chat, special_id
from tinyllm.infer.generate import generate
from tinyllm.train.objectives import sequence_logprobs


def chat_reply(model, tok: Tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The model's greedy reply to a conversation that ends with a user turn."""
    ids = tok.encode(render_chat(messages, add_generation_prompt=True), add_special_tokens=False).ids
    ids = ids[-(model.config.max_seq_len - max_new_tokens):]  # keep the newest context when too long
    stop = {special_id(tok, IM_END), special_id(tok, ENDOFTEXT)}
    return tok.decode(generate(model, ids, max_new_tokens, stop_ids=stop))


def answer_accuracy(model, tok: Tokenizer, items: list[dict], max_new_tokens: int, max_items: int,
                    seed: int) -> tuple[dict, list[dict]]:
    """Share of replies containing the expected answer, overall and per split ("seen"/"heldout")."""
    if len(items) > max_items:
        items = random.Random(seed).sample(items, max_items)
    hits: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for item in items:
        reply = chat_reply(model, tok, item["messages"], max_new_tokens)
        correct = item["answer"] in reply
        rows.append({**item, "reply": reply, "correct": correct})
        hits["overall"].append(correct)
        hits[item.get("split", "-")].append(correct)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}, rows


@torch.no_grad()
def preference_accuracy(model, tok: Tokenizer, pairs: list[dict], batch_size: int = 32) -> float:
    """Share of pairs whose chosen conversation the model scores above the rejected one."""
    model.eval()
    device = next(model.parameters()).device
    pad = special_id(tok, ENDOFTEXT)
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        scores = {}
        for side in ("chosen", "rejected"):
            # the newest max_seq_len+1 tokens: the final replies, where chosen and rejected differ
            encoded = [encode_conversation(tok, p[side]) for p in chunk]
            keep = model.config.max_seq_len + 1
            batch = collate([(ids[-keep:], mask[-keep:]) for ids, mask in encoded], pad)
            scores[side] = sequence_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device))
        wins += int((scores["chosen"] > scores["rejected"]).sum())
    return wins / len(pairs)
