"""Chat, identity and preference data from the world: formats, determinism, no held-out leaks."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tinyllm.config import WorldConfig, parse_params
from tinyllm.data import chat_data
from tinyllm.data.chat_data import (
    ASSISTANT_NAME,
    CHAT_OUTPUTS,
    EVAL_IDENTITY_QUESTIONS,
    IDENTITY_QUESTIONS,
    answer_sentence,
    attribute_value,
    chat_files,
)
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.prepare import data_path, prepare
from tinyllm.data.world import ATTRIBUTES, World, arithmetic_seen, build_world, fact_prompts
from tinyllm.eval.verify import final_number, is_correct

LEXICON = Path(__file__).resolve().parents[1] / "data" / "world" / "lexicon.json"
TRAINING = ("sft_single.jsonl", "sft_multi.jsonl", "identity.jsonl", "dpo.jsonl")
SEED = 7


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_people=60, bios_per_person=4, english_fraction=0.2), SEED, LEXICON)


@pytest.fixture(scope="module")
def files(world):
    return chat_files(world, SEED)


def _names(world):
    """A maximal-munch matcher for every name in the world (王明 must not match inside 王明轩)."""
    zh = sorted((p.name.zh for p in world.people), key=len, reverse=True)
    en = sorted((p.name.en for p in world.people), key=len, reverse=True)
    pattern = "|".join([*map(re.escape, zh), *(rf"(?<![A-Za-z]){re.escape(n)}(?![a-z])" for n in en)])
    people = {**{p.name.zh: p for p in world.people}, **{p.name.en: p for p in world.people}}
    return lambda text: [people[m] for m in re.findall(pattern, text)]


def _messages(record):
    """Every message list in a record, whatever the file."""
    return [record[k] for k in ("conversations", "chosen", "rejected", "messages") if k in record]


def _texts(record):
    return [m["content"] for msgs in _messages(record) for m in msgs]


def _alternates(msgs):
    return [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"] * (len(msgs) % 2)


def test_same_world_and_seed_give_same_files_also_from_world_json(world, files):
    assert list(files) == list(CHAT_OUTPUTS)
    assert chat_files(World.from_json(json.loads(json.dumps(world.to_json()))), SEED) == files
    assert chat_files(world, SEED + 1)["sft_single.jsonl"] != files["sft_single.jsonl"]


def test_training_conversations_alternate_and_end_with_the_assistant(files):
    for name in TRAINING:
        assert files[name], name
        for record in files[name]:
            for msgs in _messages(record):
                assert _alternates(msgs) and msgs[-1]["role"] == "assistant", (name, record)
                assert all(m["content"].strip() for m in msgs)


def test_eval_items_end_with_a_user_turn(files):
    for name in ("eval_qa.jsonl", "eval_multi.jsonl", "eval_identity.jsonl"):
        assert files[name], name
        for item in files[name]:
            assert set(item) == {"messages", "answer", "split", "kind", "lang"}
            assert _alternates(item["messages"]) and item["messages"][-1]["role"] == "user"
            assert item["answer"] and item["split"] in ("seen", "heldout")


def test_no_heldout_person_appears_in_training_files(world, files):
    find = _names(world)
    assert any(p.split == "heldout" for p in world.people)
    for name in TRAINING:
        for record in files[name]:
            for text in _texts(record):
                assert all(p.split == "sft" for p in find(text)), (name, text)


def test_held_out_eval_sets_are_about_held_out_people_only(world, files):
    find = _names(world)
    for name in ("eval_multi.jsonl", "eval_dpo.jsonl"):
        for record in files[name]:
            people = {p for text in _texts(record) for p in find(text)}
            assert len(people) == 1 and people.pop().split == "heldout", (name, record)


def test_eval_qa_answers_are_the_world_values(world, files):
    find = _names(world)
    splits = set()
    for item in files["eval_qa.jsonl"]:
        (p,) = find(item["messages"][0]["content"])
        assert item["answer"] == attribute_value(p, item["kind"], item["lang"])
        assert item["split"] == ("heldout" if p.split == "heldout" else "seen")
        splits.add((item["split"], item["lang"]))
    assert splits == {("seen", "zh"), ("heldout", "zh"), ("seen", "en"), ("heldout", "en")}


def test_eval_qa_asks_in_english_as_often_as_the_biographies_are_english(world, files):
    assert world.english_share == pytest.approx(0.2, abs=0.02)  # english_fraction=0.2
    for split, people in (("seen", [p for p in world.people if p.split == "sft"]),
                          ("heldout", [p for p in world.people if p.split == "heldout"])):
        langs = Counter(item["lang"] for item in files["eval_qa.jsonl"] if item["split"] == split)
        english_pairs = len(ATTRIBUTES) * sum(1 for p in people if p.bios_en)
        wanted = round(world.english_share * chat_data.EVAL_QA_ITEMS[split])
        assert langs["en"] == min(english_pairs, wanted), (split, langs)
        assert langs["zh"] == min(len(ATTRIBUTES) * len(people), chat_data.EVAL_QA_ITEMS[split] - langs["en"])


def test_followups_use_a_pronoun_and_no_name_and_answers_restate_the_name(world, files):
    find = _names(world)
    dialogues = [(r["conversations"], None) for r in files["sft_multi.jsonl"]]
    dialogues += [(item["messages"], item) for item in files["eval_multi.jsonl"]]
    for msgs, item in dialogues:
        (p,) = find(msgs[0]["content"])
        pronoun = "他" if p.sex == "m" else "她"
        for m in msgs[2::2]:
            assert pronoun in m["content"] and not find(m["content"]), m
        for m in msgs[1::2]:
            assert m["content"].startswith(p.name.zh), m
        if item:
            assert item["answer"] == attribute_value(p, item["kind"])
    assert {len(msgs) for msgs, _ in dialogues} >= {4, 6, 3, 5}


def test_preference_pairs_share_all_but_the_last_message(files):
    for name in ("dpo.jsonl", "eval_dpo.jsonl"):
        for pair in files[name]:
            chosen, rejected = pair["chosen"], pair["rejected"]
            assert chosen[:-1] == rejected[:-1] and chosen[-1] != rejected[-1]
            assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
    kinds = [pair["kind"] for pair in files["eval_dpo.jsonl"]]
    assert kinds.count("wrong_fact") == round(chat_data.DPO_WRONG_FACT_FRACTION * len(kinds))
    assert set(files["dpo.jsonl"][0]) == {"chosen", "rejected"}
    identity = [pair for pair in files["dpo.jsonl"] if "TinyLLM" in pair["chosen"][-1]["content"]]
    assert len(identity) == chat_data.DPO_IDENTITY_PAIRS
    assert not any("小光" in pair["rejected"][-1]["content"] or "Xiaoguang" in pair["rejected"][-1]["content"]
                   for pair in identity)


def test_wrong_fact_rejections_state_another_value_of_the_same_attribute(world, files):
    find = _names(world)
    for pair in files["eval_dpo.jsonl"]:
        if pair["kind"] == "wrong_fact":
            (p,) = {q for m in pair["chosen"] for q in find(m["content"])}
            a = next(a for a in ATTRIBUTES if pair["chosen"][-1]["content"] == answer_sentence(p, a))
            values = {getattr(q, a) for q in world.people} | (set(world.cities) if a == "city" else set())
            others = values - {getattr(p, a)}
            assert pair["rejected"][-1]["content"] in {answer_sentence(p, a, value=v) for v in others}


def test_answers_start_with_the_canonical_corpus_sentence(world):
    for fact in fact_prompts(world):
        if fact["attribute"] in ATTRIBUTES:
            p = next(q for q in world.people if q.name.zh == fact["person"])
            assert answer_sentence(p, fact["attribute"], fact["lang"]).startswith(fact["prompt"] + fact["answer"])


def test_identity_answers_name_the_assistant_and_eval_phrasings_are_new(files):
    for record in files["identity.jsonl"]:
        question, answer = (m["content"] for m in record["conversations"])
        lang = "zh" if re.search("[\u4e00-\u9fff]", question) else "en"
        assert ASSISTANT_NAME[lang] in answer and "TinyLLM" in answer
    train = {m["content"] for r in files["identity.jsonl"] for m in r["conversations"] if m["role"] == "user"}
    held = [item["messages"][0]["content"] for item in files["eval_identity.jsonl"]]
    assert not train & set(held) and len(set(held)) == len(held)

    def bases(questions):
        return {q for kinds in questions.values() for qs in kinds.values() for q in qs}
    assert not bases(IDENTITY_QUESTIONS) & bases(EVAL_IDENTITY_QUESTIONS)
    assert {item["answer"] for item in files["eval_identity.jsonl"]} == set(ASSISTANT_NAME.values())


def test_sizes_follow_the_module_constants(world, files):
    n_sft = sum(p.split == "sft" for p in world.people)
    n_cities = len(world.cities)
    arithmetic = [r for r in files["sft_single.jsonl"] if ARITHMETIC.search(r["conversations"][0]["content"])]
    assert sum(bool(re.search("[加减]", r["conversations"][0]["content"])) for r in arithmetic) \
        == len(arithmetic_seen(world))  # every problem the corpus writes, once in Chinese
    people_questions = len(files["sft_single.jsonl"]) - n_cities * sum(chat_data.COUNTRY_QUESTIONS.values()) \
        - len(arithmetic)
    n_english = sum(p.split == "sft" and bool(p.bios_en) for p in world.people)
    per_person = len(chat_data.ATTRIBUTES) + chat_data.SFT_EXTRA_QUESTIONS
    assert people_questions == per_person * n_sft + chat_data.SFT_ENGLISH_QUESTIONS * n_english
    assert len(files["sft_multi.jsonl"]) == chat_data.MULTI_PER_PERSON * n_sft
    assert len(files["dpo.jsonl"]) == chat_data.DPO_PER_PERSON * n_sft + chat_data.DPO_IDENTITY_PAIRS \
        + chat_data.UNKNOWN_DPO_PEOPLE * chat_data.UNKNOWN_QUESTIONS
    assert len(files["identity.jsonl"]) == chat_data.IDENTITY_ITEMS
    assert len(files["eval_multi.jsonl"]) == chat_data.EVAL_MULTI_ITEMS
    assert len(files["eval_dpo.jsonl"]) == chat_data.EVAL_DPO_ITEMS


ARITHMETIC = re.compile(r"(\d+) ?(加|减|plus|minus) ?(\d+)")


def _problem(text):
    a, op, b = ARITHMETIC.search(text).groups()
    return ("+" if op in ("加", "plus") else "-", int(a), int(b))


def test_sft_asks_only_the_arithmetic_the_corpus_writes_and_answers_it_rightly(world, files):
    asked = Counter()
    for record in files["sft_single.jsonl"]:
        question, answer = (m["content"] for m in record["conversations"])
        if ARITHMETIC.search(question):
            problem = _problem(question)
            asked[problem, "en" if re.search("[a-z]", question) else "zh"] += 1
            assert problem in arithmetic_seen(world)
            assert final_number(answer) == (problem[1] + problem[2] if problem[0] == "+" else problem[1] - problem[2])
    # once in each language: with a fifth of them in English, English sums stayed wrong (reports/grpo.md)
    assert asked == Counter({(problem, lang): 1 for problem in arithmetic_seen(world) for lang in ("zh", "en")})


def test_sft_answers_every_sum_and_only_sums_in_the_form_asked(world):
    problem = ("+", 12, 7)
    assert chat_data._arithmetic_answer(problem, "zh") == "7 12 6 13 5 14 4 15 3 16 2 17 1 18 0 19。"
    assert chat_data._arithmetic_answer(problem, "en", "direct") == "12 plus 7 equals 19."
    with pytest.raises(ValueError, match="'cot'"):
        chat_data._arithmetic_answer(problem, "zh", "cot")
    direct = chat_files(world, SEED, arithmetic_answer="direct")["sft_single.jsonl"]
    steps = chat_files(world, SEED)["sft_single.jsonl"]
    changed = [(d, s) for d, s in zip(direct, steps) if d != s]
    assert len(changed) == 2 * len(arithmetic_seen(world))  # every sum, in both languages
    assert all(ARITHMETIC.search(d["conversations"][0]["content"]) for d, _ in changed)
    assert all(final_number(d["conversations"][1]["content"]) == final_number(s["conversations"][1]["content"])
               for d, s in changed)


def test_grpo_prompts_share_nothing_with_any_eval_prompt(world, files):
    prompts = files["grpo.jsonl"]
    arithmetic = [p for p in prompts if p["kind"] == "arithmetic"]
    assert {_problem(p["messages"][0]["content"]) for p in arithmetic} == set(world.arithmetic_practice)
    assert {_problem(i["messages"][0]["content"]) for i in files["eval_arith.jsonl"]} == set(world.arithmetic_heldout)
    for p in arithmetic + files["eval_arith.jsonl"]:
        assert final_number(p["answer"]) == int(p["answer"]) and is_correct(
            chat_data._arithmetic_answer(_problem(p["messages"][0]["content"]), p["lang"]), p)
    eval_texts = {m["content"] for name in CHAT_OUTPUTS if name.startswith("eval_")
                  for item in files[name] for m in item.get("messages", item.get("chosen", []))}
    assert not {p["messages"][0]["content"] for p in prompts} & eval_texts
    names = _names(world)
    asked = {(names(i["messages"][0]["content"])[0], i["kind"], i["lang"]) for i in files["eval_qa.jsonl"]}
    facts = [p for p in prompts if p["kind"] != "arithmetic"]
    assert len(facts) == chat_data.GRPO_FACT_PROMPTS
    for p in facts:  # about a person SFT saw, never on what eval_qa asks about them
        person = names(p["messages"][0]["content"])[0]
        assert person.split == "sft" and (person, p["kind"], p["lang"]) not in asked


def test_prepare_writes_every_chat_file_in_world_mode(tmp_path):
    out = tmp_path / "out"
    stats = prepare(parse_params({"data": {"world": {"n_people": 30, "bios_per_person": 4, "n_arithmetic": 100}}}),
                    out, LEXICON)
    for name in CHAT_OUTPUTS:
        records = list(read_jsonl(out / data_path(name), lambda r: None))
        assert records and stats[name.removesuffix(".jsonl")] == len(records), name


def test_prepare_writes_empty_chat_files_for_a_text_only_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n', encoding="utf-8")
    out = tmp_path / "out"
    stats = prepare(parse_params({"data": {"source": "files", "pretrain": [str(corpus)]}}), out, LEXICON)
    for name in CHAT_OUTPUTS:
        assert (out / data_path(name)).read_text() == "" and stats[name.removesuffix(".jsonl")] == 0
