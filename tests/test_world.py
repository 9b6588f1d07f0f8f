"""The fictional world: deterministic, learnable (eval phrasings occur in the corpus), held-out parts held out."""

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tinyllm.config import WorldConfig
from tinyllm.data.world import (
    ATTRIBUTES,
    World,
    _arithmetic_problems,
    arithmetic_result,
    arithmetic_seen,
    arithmetic_steps,
    build_world,
    fact_prompts,
    load_world,
    pretrain_documents,
)
from tinyllm.errors import ConfigError, DataError

LEXICON = Path(__file__).resolve().parents[1] / "data" / "world" / "lexicon.json"
CFG = WorldConfig(n_people=100, bios_per_person=6, english_fraction=0.15, n_arithmetic=300, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def world():
    return build_world(CFG, 7, LEXICON)


@pytest.fixture(scope="module")
def docs(world):
    return pretrain_documents(world, CFG, 7)


@pytest.fixture(scope="module")
def corpus(docs):
    return "\n".join(docs)


def test_same_seed_gives_same_world_and_documents(world, docs):
    again = build_world(CFG, 7, LEXICON)
    assert again == world
    assert pretrain_documents(again, CFG, 7) == docs
    assert fact_prompts(again) == fact_prompts(world)


def test_different_seed_gives_different_world_and_documents(world, docs):
    other = build_world(CFG, 8, LEXICON)
    assert other != world
    assert pretrain_documents(world, CFG, 8) != docs


def test_global_random_state_is_untouched():
    random.seed(0)
    state = random.getstate()
    pretrain_documents(build_world(CFG, 7, LEXICON), CFG, 7)
    assert random.getstate() == state


def test_names_are_unique_in_both_languages(world):
    for lang in ("zh", "en"):
        names = [getattr(p.name, lang) for p in world.people]
        assert len(set(names)) == len(names) == CFG.n_people


def test_heldout_fraction_is_respected(world):
    splits = Counter(p.split for p in world.people)
    assert splits == {"heldout": round(CFG.heldout_fraction * CFG.n_people),
                      "sft": CFG.n_people - round(CFG.heldout_fraction * CFG.n_people)}


def test_attributes_are_in_range(world):
    assert all(1950 <= p.birth_year <= 2005 and p.sex in ("m", "f") for p in world.people)
    assert all(p.bios_zh + p.bios_en == CFG.bios_per_person for p in world.people)


def test_every_fact_prompt_occurs_at_least_twice_in_the_corpus(world, corpus):
    items = [i for i in fact_prompts(world) if i["attribute"] != "arithmetic"]
    assert {i["lang"] for i in items} == {"zh", "en"}
    rare = [i for i in items if corpus.count(i["prompt"] + i["answer"]) < 2]
    assert not rare, rare[:3]


def test_fact_prompts_cover_every_person_and_attribute_in_chinese(world):
    zh = {(i["person"], i["attribute"]) for i in fact_prompts(world) if i["lang"] == "zh"}
    for p in world.people:
        assert {(p.name.zh, a) for a in ("city", "job", "pet", "colour", "birth_year")} <= zh


def test_prompt_conventions(world):
    for item in fact_prompts(world):
        assert not item["prompt"].endswith(" ")
        if item["lang"] == "en":
            assert item["answer"].startswith(" ") and not item["answer"].startswith("  ")
        else:
            assert " " not in item["prompt"] + item["answer"]
    heldout = {p.name.zh for p in world.people if p.split == "heldout"}
    for item in fact_prompts(world):
        assert item["split"] == ("-" if item["person"] == "-" else "heldout" if item["person"] in heldout else "sft")


def test_heldout_and_practice_arithmetic_never_occur_in_the_corpus(world, docs):
    written = {(op, int(a), int(b)) for d in docs
               for a, op, b in re.findall(r"(\d+) ?(加|减|plus|minus) ?(\d+)", d)}
    written = {("+" if op in ("加", "plus") else "-", a, b) for op, a, b in written}
    items = [i for i in fact_prompts(world) if i["attribute"] == "arithmetic"]
    assert len(items) == 2 * len(world.arithmetic_heldout) > 0
    assert len(world.arithmetic_practice) == len(world.arithmetic_heldout)
    assert not set(world.arithmetic_practice) & set(world.arithmetic_heldout)
    assert not written & (set(world.arithmetic_heldout) | set(world.arithmetic_practice))
    assert written <= set(arithmetic_seen(world)) and written


def test_arithmetic_sentences_are_correct(docs):
    for d in docs:
        for a, op, b, r in re.findall(r"(\d+) ?(加|减|plus|minus) ?(\d+) ?(?:等于|equals) ?(\d+)", d):
            assert int(r) == (int(a) + int(b) if op in ("加", "plus") else int(a) - int(b))
            assert max(int(a), int(b), int(r)) <= 20


def test_arithmetic_steps_count_one_at_a_time_to_the_result():
    assert arithmetic_steps("+", 12, 3) == "3 12 2 13 1 14 0 15"
    assert arithmetic_steps("-", 5, 5) == "5 5 4 4 3 3 2 2 1 1 0 0"
    for op, a, b in _arithmetic_problems():
        numbers = [int(n) for n in arithmetic_steps(op, a, b).split()]
        left, values = numbers[0::2], numbers[1::2]
        assert values[0] == a and [abs(v - u) for u, v in itertools.pairwise(values)] == [1] * b  # one at a time
        assert values[-1] == arithmetic_result(op, a, b) and left == list(range(b, -1, -1))


def test_english_share_is_close_to_english_fraction(world, docs):
    names = re.compile("|".join(re.escape(n) for p in world.people for n in (p.name.zh, p.name.en)))
    bios = [d for d in docs if names.search(d)]
    assert len(bios) == CFG.n_people * CFG.bios_per_person
    share = sum(d.isascii() for d in bios) / len(bios)
    assert abs(share - CFG.english_fraction) < 0.02


@pytest.mark.parametrize("per_person, english_each", [(6, 3), (12, 6), (4, 3)])
def test_english_biographies_go_to_few_people_half_of_theirs(per_person, english_each):
    """Each person with English biographies gets max(3, half of theirs): enough English mentions of
    the name to copy it into an English answer. The total stays at english_fraction."""
    cfg = WorldConfig(n_people=100, bios_per_person=per_person, english_fraction=0.15, n_arithmetic=50)
    counts = [p.bios_en for p in build_world(cfg, 3, LEXICON).people]
    assert sum(counts) == round(0.15 * 100 * per_person)
    english = [c for c in counts if c]
    assert min(english) >= english_each and len(english) == sum(counts) // english_each


def test_half_of_a_persons_biographies_put_each_sentence_on_a_line(world, docs):
    """So pretraining reads names at line starts as a chat reply writes them: BPE's "Cao", not " Cao"."""
    person = next(p for p in world.people if p.bios_en and sum(p.name.zh in q.name.zh for q in world.people) == 1
                  and sum(p.name.en in q.name.en for q in world.people) == 1)
    for lang in ("zh", "en"):
        own = [d for d in docs if getattr(person.name, lang) in d]
        lined = [d for d in own if "\n" in d]
        assert len(lined) == len(own) // 2, lang
        assert all(len(d.split("\n")) == 1 + len(ATTRIBUTES) for d in lined)  # the opening, then one per fact
    assert any(f"\n{person.name.en} " in d for d in docs), "the English name should start some line"


def test_biographies_are_worded_differently(world, docs):
    person = next(p for p in world.people
                  if p.bios_en == 0 and sum(p.name.zh in q.name.zh for q in world.people) == 1)
    own = [d for d in docs if person.name.zh in d]
    assert len(own) == CFG.bios_per_person and len(set(own)) == len(own)
    assert any(("他" if person.sex == "m" else "她") in d for d in own), "pronouns should stand in for the name"


def test_no_english_world_has_only_chinese():
    cfg = WorldConfig(n_people=20, english_fraction=0.0, n_arithmetic=50)
    world = build_world(cfg, 1, LEXICON)
    assert not world.has_english
    assert not any(d.isascii() for d in pretrain_documents(world, cfg, 1))
    assert {i["lang"] for i in fact_prompts(world)} == {"zh"}


def test_world_json_round_trip(world, tmp_path):
    path = tmp_path / "world.json"
    path.write_text(json.dumps(world.to_json(), ensure_ascii=False), encoding="utf-8")
    assert load_world(path) == world
    assert World.from_json(json.loads(path.read_text(encoding="utf-8"))) == world


def test_too_many_people_is_a_config_error():
    with pytest.raises(ConfigError, match="data.world.n_people=100000"):
        build_world(WorldConfig(n_people=100_000), 1, LEXICON)


def test_duplicate_lexicon_word_is_a_data_error(tmp_path):
    lexicon = json.loads(LEXICON.read_text(encoding="utf-8"))
    lexicon["jobs"].append(lexicon["jobs"][0])
    path = tmp_path / "lexicon.json"
    path.write_text(json.dumps(lexicon, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"lexicon.json: .*jobs"):
        build_world(CFG, 1, path)
