"""What a chat model does: answers checked by substring, and preference accuracy.

Items come from `prepare`: `{"messages": [...ending with a user turn], "answer": "杭州", "split": ...}`
is right when the greedy reply contains the answer; a preference pair is right when the model
gives the chosen reply a higher log-probability than the rejected one, and its free (greedy)
reply takes the chosen style when it is the chosen reply word for word.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from tokenizers import Tokenizer

from tinyllm.data.chat import collate, encode_conversations
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.data.preference import encode_pairs
from tinyllm.data.tokenizer import ENDOFTEXT, render_chat, reply_stop_ids, special_id
from tinyllm.eval.metrics import GENERATION_ROWS
from tinyllm.eval.verify import is_correct
from tinyllm.infer.generate import generate_batch
from tinyllm.train.dpo import pair_logprobs
from tinyllm.train.objectives import sequence_logprobs


def chat_replies(model, tok: Tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                 batch_size: int = GENERATION_ROWS, temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The model's replies to conversations that end with a user turn (generated in batches):
    greedy, or sampled at `temperature` (seeded)."""
    keep = model.config.max_seq_len - max_new_tokens  # the newest context when a prompt is too long
    prompts = [tok.encode(render_chat(m, add_generation_prompt=True), add_special_tokens=False).ids[-keep:]
               for m in conversations]
    stop, pad = reply_stop_ids(tok), special_id(tok, ENDOFTEXT)
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        replies += [tok.decode(ids) for ids in generate_batch(model, chunk, max_new_tokens, stop_ids=stop, pad_id=pad,
                                                              temperature=temperature, seed=seed,
                                                              pad_to_rows=batch_size)]
    return replies


ABSTENTION_MARKERS = ("没有听说过", "没听说过", "资料里没有", "不认识", "没有关于", "不知道", "不清楚",
                      "never heard of", "no information about", "don't know", "do not know", "not sure who")
"""The rule for "the reply abstains": it contains one of these (case-insensitive). Covers the
abstentions DPO teaches (chat_data.ABSTAIN) and the usual ways to say one does not know."""


def is_abstention(reply: str) -> bool:
    text = reply.lower()
    return any(marker in text for marker in ABSTENTION_MARKERS)


def abstain_rate(rows: list[dict]) -> float:
    """Share of scored replies (rows with a "reply") that abstain."""
    return sum(is_abstention(r["reply"]) for r in rows) / len(rows)


def answer_accuracy(model, tok: Tokenizer, items: list[dict], max_new_tokens: int, max_items: int,
                    seed: int) -> tuple[dict, list[dict]]:
    """Share of replies containing the expected answer: overall, per split ("seen"/"heldout") and
    per split and language ("heldout/en")."""
    if len(items) > max_items:
        items = random.Random(seed).sample(items, max_items)
    hits: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for item, reply in zip(items, chat_replies(model, tok, [i["messages"] for i in items], max_new_tokens)):
        correct = item["answer"] in reply
        rows.append({**item, "reply": reply, "correct": correct})
        hits["overall"].append(correct)
        hits[item.get("split", "-")].append(correct)
        hits[f"{item.get('split', '-')}/{item.get('lang', '-')}"].append(correct)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}, rows


PASS_K = 8
"""Samples per problem for pass@k."""


def verified_accuracy(model, tok: Tokenizer, items: list[dict], max_new_tokens: int, seed: int
                      ) -> tuple[dict, list[dict]]:
    """Held-out prompts with checkable answers (the world's sums, or a user's data.grpo share) by the
    verifier's rule (tinyllm.eval.verify): "arith_heldout", the share of greedy replies that are
    right (also per language, where items say), and "arith_pass8", the share of prompts with a
    right reply among PASS_K samples at temperature 1 (seeded). Rows: the greedy replies."""
    messages = [item["messages"] for item in items]
    greedy = chat_replies(model, tok, messages, max_new_tokens)
    sampled = chat_replies(model, tok, [m for m in messages for _ in range(PASS_K)], max_new_tokens,
                           temperature=1.0, seed=seed)
    rows = [{**item, "reply": reply, "correct": is_correct(reply, item)} for item, reply in zip(items, greedy)]
    metrics = {"arith_heldout": sum(r["correct"] for r in rows) / len(rows),
               "arith_pass8": sum(any(is_correct(reply, item) for reply in sampled[i * PASS_K:(i + 1) * PASS_K])
                                  for i, item in enumerate(items)) / len(items)}
    for lang in sorted({item["lang"] for item in items if "lang" in item}):  # the world's sets say
        mine = [r["correct"] for r in rows if r.get("lang") == lang]
        metrics[f"arith_heldout_{lang}"] = sum(mine) / len(mine)
    return metrics, rows


def preference_accuracy(model, tok: Tokenizer, pairs: list[dict]) -> tuple[dict, torch.Tensor]:
    """Share of pairs whose chosen final reply the model scores above the rejected one, overall
    and per kind ("wrong_fact", "unhelpful"); scored exactly as DPO trains (final reply, fp32).
    Also the (len(pairs), 2) summed log-probs, for reward margins against a reference model."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tok, pairs)
    logps = pair_logprobs(model, encoded, model.config.max_seq_len, special_id(tok, ENDOFTEXT), device, torch.float32)
    wins = (logps[:, 0] > logps[:, 1]).tolist()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for pair, win in zip(pairs, wins):
        by_kind["overall"].append(win)
        by_kind[pair.get("kind", "-")].append(win)
    return {key: sum(v) / len(v) for key, v in sorted(by_kind.items())}, logps


def reward_margin(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> float:
    """DPO's implicit reward margin, mean over pairs: β·[(log π − log π_ref)(chosen) − (…)(rejected)]."""
    rewards = beta * (logps - ref_logps)
    return float((rewards[:, 0] - rewards[:, 1]).mean())


@torch.no_grad()
def scored_rows(model, tok: Tokenizer, rows: list[tuple], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (ids, mask) row: the summed log-prob of its masked tokens and how many there are (fp32,
    eval mode, in batches). A row longer than the model keeps its newest tokens."""
    device = next(model.parameters()).device
    keep = model.config.max_seq_len + 1
    was_training = model.training
    model.eval()
    logps, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate([(ids[-keep:], mask[-keep:]) for ids, mask in rows[start:start + batch_size]],
                        special_id(tok, ENDOFTEXT))
        logps.append(sequence_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device)).cpu())
        counts.append((batch["labels"] != IGNORE_INDEX).sum(-1))
    model.train(was_training)
    return torch.cat(logps), torch.cat(counts)


def reply_loss(model, tok: Tokenizer, conversations: list[list[dict]]) -> tuple[float, int]:
    """(mean loss per assistant token, number of those tokens) over whole conversations: every
    assistant turn is scored. Unlike SFT's packing, a conversation longer than the model keeps its
    newest tokens (the last replies), and no system prompt is added."""
    if not conversations:
        return 0.0, 0
    logps, counts = scored_rows(model, tok, encode_conversations(tok, conversations), batch_size=32)
    count = int(counts.sum())
    return -float(logps.sum()) / max(count, 1), count


def chosen_style_rate(model, tok: Tokenizer, pairs: list[dict], max_new_tokens: int, max_items: int,
                      seed: int) -> tuple[dict, list[dict]]:
    """How often the model's own greedy reply to a pair's context IS the chosen reply (exactly),
    and how often it is the rejected one: what preference training changes in free generation."""
    if len(pairs) > max_items:
        pairs = random.Random(seed).sample(pairs, max_items)
    rows = []
    replies = chat_replies(model, tok, [pair["chosen"][:-1] for pair in pairs], max_new_tokens)
    for pair, reply in zip(pairs, map(str.strip, replies)):
        rows.append({"messages": pair["chosen"][:-1], "reply": reply, "answer": pair["chosen"][-1]["content"],
                     "correct": reply == pair["chosen"][-1]["content"].strip(),
                     "rejected": reply == pair["rejected"][-1]["content"].strip()})
    return {"chosen": sum(r["correct"] for r in rows) / len(rows),
            "rejected": sum(r["rejected"] for r in rows) / len(rows)}, rows
