"""Questions about people who are not in the world: the data that teaches abstaining, and the rule that detects it."""

import pytest

from tinyllm.config import WorldConfig
from tinyllm.data import chat_data
from tinyllm.data.chat_data import ABSTAIN, UNHELPFUL, chat_files
from tinyllm.data.world import build_world
from tinyllm.eval.chat_eval import abstain_rate, is_abstention


@pytest.mark.parametrize("reply", [*(p.format(name="潘小梅") for p in ABSTAIN["zh"]),
                                   *(p.format(name="Pan Xiaomei") for p in ABSTAIN["en"]),
                                   "我不知道这个人。", "I do not know who that is.", "I'm not sure who Pan Xiaomei is.",
                                   "我没听说过她。", "I DON'T KNOW."])
def test_abstentions_are_detected(reply):
    assert is_abstention(reply)


@pytest.mark.parametrize("reply", ["潘小梅住在杭州。", "Pan Xiaomei lives in Hangzhou.", "李明的宠物是猫。",
                                   "我是小光，是 TinyLLM 团队开发的 AI 助手。", "She knows Li Ming well.", ""])
def test_answers_are_not_abstentions(reply):
    assert not is_abstention(reply)


def test_abstain_rate():
    assert abstain_rate([{"reply": "我不认识他。"}, {"reply": "他住在杭州。"}]) == 0.5


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_people=60), 5, "data/world/lexicon.json")


def test_unknown_people_are_not_in_the_world_and_leave_it_unchanged(world):
    names = {p.name.zh for p in world.people} | {p.name.en for p in world.people}
    assert len(world.unknown) == 200 and not any(p.name.zh in names or p.name.en in names for p in world.unknown)
    assert len({p.name.zh for p in world.unknown}) == 200
    assert build_world(WorldConfig(n_people=60), 5, "data/world/lexicon.json").people == world.people


def test_dpo_teaches_abstaining_on_some_unknown_people_and_eval_asks_about_others(world):
    files = chat_files(world, 5)
    abstaining = [p for p in files["dpo.jsonl"] if is_abstention(p["chosen"][-1]["content"])]
    assert len(abstaining) == chat_data.UNKNOWN_DPO_PEOPLE * chat_data.UNKNOWN_QUESTIONS
    assert not any(is_abstention(p["rejected"][-1]["content"]) for p in abstaining)  # an invented fact
    trained = {p["chosen"][0]["content"] for p in abstaining}
    asked = [item["messages"][0]["content"] for item in files["eval_unknown.jsonl"]]
    assert len(asked) == (200 - chat_data.UNKNOWN_DPO_PEOPLE) * chat_data.UNKNOWN_QUESTIONS
    dpo_names = {p.name.zh for p in world.unknown[:chat_data.UNKNOWN_DPO_PEOPLE]}
    assert not trained & set(asked) and not any(n in q for n in dpo_names for q in asked)
    sft = [m["content"] for name in ("sft_single.jsonl", "sft_multi.jsonl", "identity.jsonl")
           for r in files[name] for m in r["conversations"] if m["role"] == "assistant"]
    assert not any(is_abstention(reply) for reply in sft)  # the effect is DPO's alone
    assert {item["lang"] for item in files["eval_unknown.jsonl"]} == {"zh", "en"}


def test_the_rude_non_answers_dpo_rejects_are_abstentions_too():
    """known_false_abstain counts them: a model that says 我不知道 about a known person abstains wrongly."""
    assert any(is_abstention(u) for u in UNHELPFUL)
