"""Real corpus formats: detection, conversion (outputs pinned), and prepare on the example files
in data/corpus/examples (MiniMind, Seq-Monkey, ShareGPT, Alpaca, deepctrl), broken lines included."""

import json
import logging
import re
from pathlib import Path

import pytest

from tinyllm.config import parse_params
from tinyllm.data.formats import convert, detect
from tinyllm.data.prepare import prepare
from tinyllm.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "corpus" / "examples"
LEXICON = ROOT / "data" / "world" / "lexicon.json"
USER, BOT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("record, fmt", [
    ({"text": "一段话"}, "text"),
    ({"conversations": [msg(USER, "q"), msg(BOT, "a")]}, "minimind_sft"),
    ({"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"instruction": "q", "input": "", "output": "a", "history": []}, "deepctrl"),
    ({"chosen": [msg(USER, "q"), msg(BOT, "a")], "rejected": [msg(USER, "q"), msg(BOT, "b")]}, "minimind_dpo"),
    ({"question": "1+1?", "answer": "1+1=2\n#### 2"}, "gsm8k"),
    ({"messages": [msg(USER, "q")], "answer": "a"}, "verifiable"),
    ({"prompt": "q"}, None),
    (["text"], None),
])
def test_detect_tells_the_format_from_the_keys(record, fmt):
    assert detect(record) == fmt


def test_conversions_to_the_pipeline_layout_are_pinned():
    sharegpt = {"id": "x", "conversations": [{"from": "system", "value": "Be brief."},
                                             {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    assert convert("sharegpt", sharegpt) == ({"conversations": [
        msg("system", "Be brief."), msg(USER, "Hi?"), msg(BOT, "Hello.")]}, None)
    alpaca = {"instruction": "翻译成英文", "input": "你好", "output": "Hello"}
    assert convert("alpaca", alpaca) == ({"conversations": [msg(USER, "翻译成英文\n你好"), msg(BOT, "Hello")]}, None)
    deepctrl = {"instruction": "那明天呢？", "input": "", "output": "明天下雨。",
                "history": [["今天天气如何？", "今天晴。"]]}
    assert convert("deepctrl", deepctrl) == ({"conversations": [
        msg(USER, "今天天气如何？"), msg(BOT, "今天晴。"), msg(USER, "那明天呢？"), msg(BOT, "明天下雨。")]}, None)
    # only "text" is kept
    assert convert("text", {"text": "正文", "source": "web", "id": 3}) == ({"text": "正文"}, None)
    gsm8k = {"question": "Tom has 3 boxes of 400 pens. How many pens?", "answer": "3 × 400 = 1,200\n#### 1,200"}
    assert convert("gsm8k", gsm8k) == ({"messages": [msg(USER, gsm8k["question"])], "answer": "1200",
                                        "kind": "arithmetic"}, None)
    verifiable = {"messages": [msg(USER, "李明住在哪里？")], "answer": "杭州", "id": 7}
    assert convert("verifiable", verifiable) == ({"messages": [msg(USER, "李明住在哪里？")], "answer": "杭州",
                                                  "kind": "text"}, None)


@pytest.mark.parametrize("fmt, record, problem", [
    ("text", {"text": ""}, '"text" is empty'),
    ("text", {"text": "\ud800"}, "lone surrogate"),
    ("minimind_sft", {"conversations": []}, '"conversations" is empty'),
    ("minimind_sft", {"conversations": [msg(USER, "q")]}, "the last message must be the assistant's"),
    ("sharegpt", {"conversations": [{"from": "narrator", "value": "q"}]}, 'unknown speaker "from"'),
    ("alpaca", {"instruction": "q"}, 'missing "output"'),
    ("alpaca", {"instruction": " ", "output": "a"}, "no user message has any text"),
    ("deepctrl", {"instruction": "q", "output": "a", "history": [["only a question"]]}, '"history" must be a list'),
    ("deepctrl", {"instruction": "q", "output": "  ", "history": []}, "the last assistant reply is empty"),
    ("minimind_dpo", {"chosen": [msg(USER, "q"), msg(BOT, "a")], "rejected": [msg(USER, "q"), msg(BOT, "a")]},
     "identical"),
    ("minimind_dpo", {"chosen": []}, 'missing "rejected"'),
    ("alpaca", "just a string", "expected a JSON object"),
    ("gsm8k", {"question": "q", "answer": "forty-two"}, '"#### <number>" line'),
    ("gsm8k", {"question": "q", "answer": "#### -3"}, "negative answer"),
    ("gsm8k", {"question": " ", "answer": "#### 3"}, "the last message must be the user's"),
    ("verifiable", {"messages": [msg(USER, "q"), msg(BOT, "a")], "answer": "a"}, "the last message must be"),
    ("verifiable", {"messages": [msg(USER, "q")], "answer": "x", "kind": "arithmetic"}, "whole-number"),
])
def test_unusable_records_say_why(fmt, record, problem):
    converted, reason = convert(fmt, record)
    assert converted is None and problem in reason


def _example_params(**data):
    return parse_params({"data": {"source": "files",
                                  "pretrain": [str(EXAMPLES / "minimind_pretrain.jsonl"),
                                               str(EXAMPLES / "seq_*.jsonl")],
                                  "sft": [str(EXAMPLES / n) for n in ("minimind_sft.jsonl", "sharegpt.jsonl",
                                                                      "alpaca.jsonl", "deepctrl_sft_data_zh.jsonl")],
                                  "identity": [str(EXAMPLES / "minimind_lora_identity.jsonl")],
                                  "dpo": [str(EXAMPLES / "minimind_dpo.jsonl")],
                                  "grpo": [str(EXAMPLES / "gsm8k_style.jsonl")], **data}})


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_reads_every_example_format_and_counts_what_it_drops(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    stats = prepare(_example_params(), tmp_path, LEXICON)
    # the broken lines planted in the examples: non-UTF-8 bytes, cut JSON, empty text, wrong keys,
    # a JSON array, empty conversations, unknown speaker, missing output, bad history, identical DPO
    # replies; a GSM8K line without "####", one with an empty question, one not JSON
    assert stats["bad_lines_skipped"] == 19
    assert "gsm8k_style.jsonl:18: the \"answer\" must end with" in caplog.text
    assert "minimind_pretrain.jsonl:11: not valid UTF-8" in caplog.text
    assert "sharegpt.jsonl:21: message 0: unknown speaker" in caplog.text
    pretrain = _lines(tmp_path / "pretrain.jsonl")
    assert stats["documents"] == len(pretrain) and all(set(r) == {"text"} for r in pretrain)
    assert len({r["text"] for r in pretrain}) == len(pretrain)  # exact duplicates removed
    assert max(len(r["text"]) for r in pretrain) > 5000  # the huge record survives
    single, multi = _lines(tmp_path / "chat/sft_single.jsonl"), _lines(tmp_path / "chat/sft_multi.jsonl")
    assert all(sum(m["role"] == USER for m in r["conversations"]) == 1 for r in single)
    assert all(sum(m["role"] == USER for m in r["conversations"]) > 1 for r in multi)
    assert {"minimind_sft", "sharegpt", "alpaca", "deepctrl"} <= {
        fmt for fmt in re.findall(r": (\w+) format", caplog.text)}
    assert (stats["sft_single"], stats["sft_multi"]) == (len(single), len(multi))
    assert stats["dpo"] + stats["eval_dpo"] == 20 and stats["eval_dpo"] == 10  # half held out: fewer than 2 × 20
    assert stats["identity"] == len(_lines(tmp_path / "chat/identity.jsonl")) > 0
    assert stats["eval_qa"] == 0 and (tmp_path / "world.json").read_text() == "null\n"
    prompts, held = _lines(tmp_path / "grpo.jsonl"), _lines(tmp_path / "eval/eval_arith.jsonl")
    assert (stats["grpo"], stats["eval_arith"]) == (len(prompts), len(held)) == (40, 20)  # 60 good lines
    assert all(p["kind"] == "arithmetic" and p["answer"].isdigit() for p in prompts + held)
    assert not {p["messages"][0]["content"] for p in prompts} & {p["messages"][0]["content"] for p in held}


def test_length_filters_and_dedup_switch(tmp_path):
    kept = prepare(_example_params(min_chars=50, max_chars=2000, dedup=False), tmp_path / "all", LEXICON)
    assert kept["filtered_by_length"] > 0 and kept["duplicates_removed"] == 0
    assert all(50 <= len(r["text"]) <= 2000 for r in _lines(tmp_path / "all" / "pretrain.jsonl"))
    deduped = prepare(_example_params(min_chars=50, max_chars=2000), tmp_path / "dedup", LEXICON)
    assert deduped["duplicates_removed"] > 0
    counted = ("documents", "sft_single", "sft_multi", "heldout_single", "heldout_multi", "identity")
    assert sum(deduped[k] for k in counted) + deduped["duplicates_removed"] == sum(kept[k] for k in counted)


def test_a_bad_first_line_does_not_decide_a_files_format(tmp_path):
    turn = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    chats = tmp_path / "sharegpt.jsonl"
    chats.write_text("\n".join(json.dumps(r) for r in [{"conversations": []}, {"conversations": turn},
                                                        {"conversations": turn[::-1] + turn}]) + "\n")
    stats = prepare(_example_params(sft=[str(chats)]), tmp_path / "out", LEXICON)
    assert (stats["sft_single"], stats["sft_multi"]) == (1, 1)
    assert stats["bad_lines_skipped"] == 19 - 9 + 1  # the examples' minus their 9 sft ones, plus the empty one here


def test_a_file_named_twice_is_read_once_and_extra_message_keys_are_dropped(tmp_path):
    chats = tmp_path / "sft.jsonl"
    chats.write_text(json.dumps({"conversations": [{"role": "user", "content": "q", "name": "\ud800"},
                                                   {"role": "assistant", "content": "a", "loss": True}]}) + "\n")
    spelled_twice = [str(chats), str(tmp_path / ".." / tmp_path.name / "sft.jsonl")]
    stats = prepare(_example_params(sft=spelled_twice, dedup=False), tmp_path / "out", LEXICON)
    assert stats["sft_single"] == 1
    assert _lines(tmp_path / "out/chat/sft_single.jsonl") == [{"conversations": [msg(USER, "q"), msg(BOT, "a")]}]


def test_strict_stops_at_the_first_bad_line_and_keeps_the_old_outputs(tmp_path):
    prepare(_example_params(), tmp_path, LEXICON)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"minimind_pretrain.jsonl:11: not valid UTF-8"):
        prepare(_example_params(strict=True), tmp_path, LEXICON)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_file_of_the_wrong_kind_or_a_glob_matching_nothing_is_named(tmp_path):
    with pytest.raises(DataError, match=r"minimind_dpo.jsonl: no usable sft records"):
        prepare(_example_params(sft=[str(EXAMPLES / "minimind_dpo.jsonl")]), tmp_path, LEXICON)
    with pytest.raises(DataError, match=r"data.dpo: '.*nothing\*.jsonl' matches no file"):
        prepare(_example_params(dpo=[str(tmp_path / "nothing*.jsonl")]), tmp_path, LEXICON)


def test_format_param_overrides_detection(tmp_path):
    """format: alpaca reads deepctrl lines as alpaca (history ignored); identity files still detect."""
    data = tmp_path / "dc.jsonl"
    data.write_text(json.dumps({"instruction": "q", "input": "", "output": "a", "history": [["h", "i"]]}) + "\n")
    out = tmp_path / "out"
    prepare(_example_params(sft=[str(data)], format="alpaca"), out, LEXICON)
    assert _lines(out / "chat/sft_single.jsonl") == [{"conversations": [msg(USER, "q"), msg(BOT, "a")]}]


def test_a_huge_single_line_record_streams_through(tmp_path):
    """A 20 MB document on one line (MiniMind issue #604-style dumps): read, kept whole, counted."""
    big = "长文本" * 3_500_000 + "end"
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": big}, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    out = tmp_path / "out"
    stats = prepare(parse_params({"data": {"source": "files", "pretrain": [str(corpus)]}}), out, LEXICON)
    assert stats["documents"] == 2 and stats["characters"] == len("short") + len(big)
    assert _lines(out / "pretrain.jsonl")[1]["text"] == big

