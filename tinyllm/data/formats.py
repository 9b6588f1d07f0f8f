"""Public corpus formats, turned into the pipeline's own records.

The seed's data sets come in a handful of JSON Lines layouts. `prepare` reads them all and writes
one layout per kind, so nothing downstream knows where the data came from:

- pretrain, `text`: `{"text": "..."}` (MiniMind pretrain, Seq-Monkey);
- sft, `minimind_sft`: `{"conversations": [{"role": "user", "content": "..."}, ...]}` (MiniMind SFT);
- sft, `sharegpt`: `{"conversations": [{"from": "human", "value": "..."}, ...]}` (ShareGPT);
- sft, `alpaca`: `{"instruction": "...", "input": "...", "output": "..."}` (Alpaca);
- sft, `deepctrl`: alpaca's keys + `"history": [["q", "a"], ...]` (deepctrl `sft_data_zh.jsonl`);
- identity, any sft format: the conversations the lora stage teaches (MiniMind `lora_identity.jsonl`);
- dpo, `minimind_dpo`: `{"chosen": [msgs], "rejected": [msgs]}` (MiniMind DPO);
- grpo, `gsm8k`: `{"question": "...", "answer": "worked solution\n#### 42"}` (GSM8K): the number
  after "####" is what a reply must end on;
- grpo, `verifiable`: `{"messages": [msgs ending with the user's], "answer": "...", "kind"?}` (ours:
  kind "arithmetic" checks the reply's final number, any other the answer's text in the reply).

Out: pretrain `{"text"}`, sft `{"conversations": [{"role", "content"}]}` (MiniMind's layout),
dpo `{"chosen", "rejected"}`, grpo `{"messages", "answer", "kind"}`.

    fmt = detect(first_record)                   # "sharegpt"
    record, problem = convert(fmt, obj)          # ({"conversations": [...]}, None) or (None, "why")
"""

from __future__ import annotations

import re

from tinyllm.data.chat import validate_conversation
from tinyllm.data.format_names import FORMATS
from tinyllm.data.jsonl import validate_pretrain
from tinyllm.data.preference import validate_preference
from tinyllm.eval.verify import validate_prompt

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
"""ShareGPT speaker names (the dumps use several for the model) → ChatML roles."""


def detect(obj, formats: tuple[str, ...] = FORMATS) -> str | None:
    """The first of `formats` whose keys the record has, or None. Structured layouts are tried
    before `text`, so a chat record that also carries a "text" field is read as chat."""
    if not isinstance(obj, dict):
        return None
    messages = obj.get("conversations")
    first = messages[0] if isinstance(messages, list) and messages else None
    sharegpt = isinstance(first, dict) and "from" in first
    signs = {
        "minimind_dpo": "chosen" in obj and "rejected" in obj,
        "verifiable": "messages" in obj and "answer" in obj,
        "gsm8k": "question" in obj and "answer" in obj,
        "sharegpt": "conversations" in obj and sharegpt,
        "minimind_sft": "conversations" in obj and not sharegpt,
        "deepctrl": "instruction" in obj and "output" in obj and "history" in obj,
        "alpaca": "instruction" in obj and "output" in obj,
        "text": "text" in obj,
    }
    return next((fmt for fmt in signs if fmt in formats and signs[fmt]), None)


def convert(fmt: str, obj) -> tuple[dict | None, str | None]:
    """(the record in the pipeline's layout, None), or (None, why the line is unusable)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object ({fmt}), got a JSON {type(obj).__name__}"
    record, problem = _CONVERTERS[fmt](obj)
    if problem is None:
        problem = _CHECKS[fmt](record)
    if problem is None and not _encodable(record_text(record)):
        problem = "holds a lone surrogate escape (like \\ud800), which is not text"
    return (None, problem) if problem else (record, None)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def record_text(record: dict) -> str:
    """Every character a converted record holds (for the length filters)."""
    if "text" in record:
        return record["text"]
    if "answer" in record:
        return "\n".join([*(m["content"] for m in record["messages"]), record["answer"]])
    messages = record.get("conversations") or record["chosen"] + record["rejected"][-1:]
    return "\n".join(m["content"] for m in messages)


def _keep(*keys: str):
    """A converter for a layout that is already ours: keep its keys, drop any others (and, in
    message lists, every message key but "role" and "content")."""
    def converter(obj):
        missing = [k for k in keys if k not in obj]
        if missing:
            return None, f'missing "{missing[0]}" (a line must have {", ".join(repr(k) for k in keys)})'
        return {k: _messages(obj[k]) for k in keys}, None
    return converter


def _messages(value):
    if not isinstance(value, list):
        return value
    return [{k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m for m in value]


def _sharegpt(obj):
    messages = obj.get("conversations")
    if not isinstance(messages, list):
        return None, 'expected a "conversations" list'
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            return None, f'message {i}: expected {{"from": ..., "value": string}}'
        role = SHAREGPT_ROLES.get(str(m.get("from")).lower())
        if role is None:
            return None, f'message {i}: unknown speaker "from": {m.get("from")!r} (known: {", ".join(SHAREGPT_ROLES)})'
        out.append({"role": role, "content": m["value"]})
    return {"conversations": out}, None


def _instruction(obj, history_key: str | None):
    """Alpaca and deepctrl: earlier turns (deepctrl's history), then instruction + input → output."""
    for key in ("instruction", "output"):
        if key not in obj:
            return None, f'missing "{key}"'
        if not isinstance(obj[key], str):
            return None, f'"{key}" must be a string'
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        return None, '"input" must be a string'
    history = (obj.get(history_key) or []) if history_key else []
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        return None, f'"{history_key}" must be a list of [question, answer] string pairs'
    messages = [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]
    prompt = obj["instruction"] + ("\n" + extra if extra.strip() else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    return {"conversations": messages}, None


GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]+)\s*$")
"""GSM8K's final line: "#### 42" (thousands may carry commas)."""


def _gsm8k(obj):
    for key in ("question", "answer"):
        if not isinstance(obj.get(key), str):
            return None, f'"{key}" must be a string'
    found = GSM8K_ANSWER.search(obj["answer"].strip())
    if found is None:
        return None, 'the "answer" must end with a "#### <number>" line (GSM8K\'s final answer)'
    number = found.group(1).replace(",", "")
    if number.startswith("-"):
        return None, f"negative answer {number}: the verifier reads whole numbers without a sign"
    return {"messages": [{"role": "user", "content": obj["question"]}], "answer": str(int(number)),
            "kind": "arithmetic"}, None


def _verifiable(obj):
    kind = obj.get("kind", "text")
    if not isinstance(kind, str):
        return None, '"kind" must be a string'
    return {"messages": _messages(obj.get("messages")), "answer": obj.get("answer"), "kind": kind}, None


def _no_empty_message(record: dict) -> str | None:
    problem = validate_conversation(record)
    if problem is None and not any(m["content"].strip() for m in record["conversations"] if m["role"] == "user"):
        return "no user message has any text"
    if problem is None and not record["conversations"][-1]["content"].strip():
        return "the last assistant reply is empty"
    return problem


_CONVERTERS = {"text": _keep("text"), "minimind_sft": _keep("conversations"), "sharegpt": _sharegpt,
               "alpaca": lambda obj: _instruction(obj, None), "deepctrl": lambda obj: _instruction(obj, "history"),
               "minimind_dpo": _keep("chosen", "rejected"), "gsm8k": _gsm8k, "verifiable": _verifiable}
_CHECKS = {"text": validate_pretrain, "minimind_sft": _no_empty_message, "sharegpt": _no_empty_message,
           "alpaca": _no_empty_message, "deepctrl": _no_empty_message, "minimind_dpo": validate_preference,
           "gsm8k": validate_prompt, "verifiable": validate_prompt}
