"""The prepare stage: world mode writes the three outputs; a bad user corpus changes nothing."""

import re
from pathlib import Path

import pytest

from tinyllm.config import parse_params
from tinyllm.data.chat_data import CHAT_OUTPUTS
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.prepare import OUTPUTS, prepare
from tinyllm.data.world import load_world
from tinyllm.errors import DataError

LEXICON = Path(__file__).resolve().parents[1] / "data" / "world" / "lexicon.json"
SMALL_WORLD = {"n_people": 30, "bios_per_person": 4, "n_arithmetic": 100}


def _jsonl_params(path, strict=True):
    return parse_params({"data": {"source": "files", "pretrain": [str(path)], "strict": strict}})


def _corpus(tmp_path, *lines):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_world_mode_writes_corpus_eval_facts_and_world(tmp_path):
    out = tmp_path / "out"
    stats = prepare(parse_params({"data": {"world": SMALL_WORLD}}), out, LEXICON)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(OUTPUTS)
    texts = [r["text"] for r in read_jsonl(out / "pretrain.jsonl", lambda r: None)]
    facts = list(read_jsonl(out / "eval/eval_facts.jsonl", lambda r: None))
    assert stats["documents"] == len(texts) and stats["characters"] == sum(map(len, texts))
    assert stats["eval_facts"] == len(facts) and {"prompt", "answer", "attribute", "split"} <= facts[0].keys()
    assert stats["people"] == len(load_world(out / "world.json").people) == 30
    assert stats["bad_lines_skipped"] == 0


@pytest.mark.parametrize("form, reply", [("steps", r"(\d+ \d+ )+\d+ \d+。"), ("direct", r"\d+[加减]\d+等于\d+。")])
def test_sft_sums_take_the_answer_form_params_name(tmp_path, form, reply):
    params = parse_params({"data": {"world": {**SMALL_WORLD, "arithmetic_answer": form}}})
    prepare(params, tmp_path, LEXICON)
    answers = [r["conversations"][1]["content"] for r in read_jsonl(tmp_path / "chat/sft_single.jsonl", lambda r: None)
               if re.search(r"\d+(加|减)\d+", r["conversations"][0]["content"])]
    assert answers and all(re.fullmatch(reply, answer) for answer in answers)


def test_files_mode_bad_line_errors_and_leaves_existing_outputs_untouched(tmp_path):
    out = tmp_path / "out"
    prepare(parse_params({"data": {"world": SMALL_WORLD}}), out, LEXICON)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    path = _corpus(tmp_path, '{"text": "good"}', '{"text": ', '{"text": "also good"}')
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: not valid JSON"):
        prepare(_jsonl_params(path), out, LEXICON)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_files_mode_skip_keeps_good_texts_and_counts_bad_lines(tmp_path):
    path = _corpus(tmp_path, '{"text": "第一篇", "source": "web"}', "oops", '{"text": ""}', '{"text": "second"}')
    out = tmp_path / "out"
    stats = prepare(_jsonl_params(path, strict=False), out, LEXICON)
    assert list(read_jsonl(out / "pretrain.jsonl", lambda r: None)) == [{"text": "第一篇"}, {"text": "second"}]
    assert stats == {"documents": 2, "characters": 9, "bad_lines_skipped": 2, "duplicates_removed": 0,
                     "filtered_by_length": 0, "people": 0, "eval_facts": 0,
                     **{name.removesuffix(".jsonl"): 0 for name in CHAT_OUTPUTS}, "heldout_single": 0,
                     "heldout_multi": 0}
    assert (out / "eval/eval_facts.jsonl").read_text() == ""
    assert load_world(out / "world.json") is None


def test_files_mode_with_no_usable_line_is_an_error(tmp_path):
    path = _corpus(tmp_path, "oops", '{"text": 1}')
    with pytest.raises(DataError, match="no usable pretrain records"):
        prepare(_jsonl_params(path, strict=False), tmp_path / "out", LEXICON)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_files_mode_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl"):
        prepare(_jsonl_params(tmp_path / "absent.jsonl"), tmp_path / "out", LEXICON)


def test_a_seeded_share_of_the_sft_conversations_is_held_out(tmp_path):
    params = parse_params({"data": {"world": SMALL_WORLD, "heldout_share": 0.1, "heldout_min": 5}})
    stats = prepare(params, tmp_path / "a", LEXICON)
    again = prepare(params, tmp_path / "b", LEXICON)
    for kind in ("single", "multi"):
        train = (tmp_path / f"a/chat/sft_{kind}.jsonl").read_text(encoding="utf-8").splitlines()
        held = (tmp_path / f"a/chat/heldout_{kind}.jsonl").read_text(encoding="utf-8").splitlines()
        total = len(train) + len(held)
        assert (stats[f"sft_{kind}"], stats[f"heldout_{kind}"]) == (len(train), len(held))
        assert len(held) == min(max(5, round(0.1 * total)), total // 2) > 0
        assert set(train).isdisjoint(held)
        assert held == (tmp_path / f"b/chat/heldout_{kind}.jsonl").read_text(encoding="utf-8").splitlines()
    assert again == stats
