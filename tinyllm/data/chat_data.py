"""Chat, identity and preference data about the fictional world, and the held-out sets that grade them.

    files = chat_files(world, seed)        # {"sft_single.jsonl": [records], ...}, CHAT_OUTPUTS order
    prepare writes each list under artifacts/data/ (chat/, eval/ or beside pretrain.jsonl: prepare.data_path)

Everything is computed from the `World` alone (so it can be rebuilt from world.json) and is the
same for the same world and seed. Each file draws from its own `random.Random(f"{seed}/{file}")`,
so changing one file's count leaves the others as they were.

Formats (MiniMind): training conversations `{"conversations": [{"role", "content"}, ...]}`,
preferences `{"chosen": [msgs], "rejected": [msgs]}` (whole conversations differing only in the
last assistant message). Eval items `{"messages": [... last user turn], "answer": substring the
reply must contain, "split": "seen"|"heldout", "kind": ..., "lang": "zh"|"en"}`, where kind is the
attribute asked (eval_qa, eval_multi) or the identity question's kind ("who", "maker", "not"; all
eval_identity items are "heldout": phrasings never trained on). eval_dpo items are preference
pairs plus "kind" ("wrong_fact"|"unhelpful") and "split" ("heldout").

Answer style (why: a 2M-param model learns this in minutes): a question names a person and asks
one attribute in one of several phrasings; the answer is the single canonical corpus sentence
with the name spelled out ("李明住在哪个城市？" → "李明住在杭州。"), so answering replays the exact
token path pretraining read ("李明住在" → "杭州"). Follow-up questions in multi-turn dialogues
refer back by pronoun ("那他养了什么宠物？") and the answer STILL restates the name ("李明的宠物是猫。"):
the model copies the name from the earlier turn, then the fact follows as in pretraining, instead
of having to resolve 他 → 李明 silently inside one token. One style everywhere.

Held-out people (split "heldout") never appear in sft_single, sft_multi, dpo or identity; their
facts were only read in pretraining. eval_multi and eval_dpo are about them only; eval_qa has
both. English appears for people with English biographies (single-turn SFT and eval_qa, a
small share), in the identity sets, and in SFT's sums: every sum the corpus writes is asked once
in Chinese and once in English.
"""

from __future__ import annotations

import dataclasses
import random

from tinyllm.config import ARITHMETIC_ANSWERS, WorldConfig
from tinyllm.data.world import (
    ATTRIBUTES,
    LANGUAGES,
    City,
    Person,
    World,
    arithmetic_cloze,
    arithmetic_result,
    arithmetic_seen,
    arithmetic_steps,
    fact_fields,
    render_template,
    subject_fields,
)

CHAT_OUTPUTS = ("sft_single.jsonl", "sft_multi.jsonl", "identity.jsonl", "dpo.jsonl", "grpo.jsonl", "eval_qa.jsonl",
                "eval_multi.jsonl", "eval_identity.jsonl", "eval_dpo.jsonl", "eval_unknown.jsonl", "eval_arith.jsonl",
                "bench_world.jsonl")
"""Files prepare writes (empty ones when the corpus is a user's, not the world)."""

ASSISTANT_NAME = {"zh": "小光", "en": "Xiaoguang"}
"""The assistant's name: every identity answer contains it, so eval_identity checks it by substring."""

# --- counts (at the default 300 people with 20% held out: 240 sft people, 60 held-out people) ---

SFT_EXTRA_QUESTIONS = 2
"""Single-turn: each sft person is asked every attribute once, plus this many repeats in another
phrasing (5 + 2 = 7 Chinese questions per person)."""
SFT_ENGLISH_QUESTIONS = 5
"""Single-turn English questions per sft person who has English biographies (every attribute: with
two, the model answered only 1 in 10 English questions about seen people; English is a small share
of what it read)."""
COUNTRY_QUESTIONS = {"zh": 2, "en": 1}
"""Single-turn "which country is <city> in" questions per city and language (English only when the
world has English text)."""
MULTI_PER_PERSON = 2
"""Multi-turn conversations per sft person."""
MULTI_TURNS = (2, 3)
"""User turns per multi-turn conversation, drawn uniformly."""
DPO_PER_PERSON = 2
"""Preference pairs per sft person."""
DPO_WRONG_FACT_FRACTION = 0.7
"""Share of pairs whose rejected reply states a wrong value; the rest are unhelpful/rude replies."""
DPO_IDENTITY_PAIRS = 120
"""Identity preference pairs in dpo.jsonl: without them, DPO pushing down unhelpful replies that
start with 我 ("我不知道…") also pushed down "我是小光…" (identity 89% → 75% after DPO)."""
DPO_FOLLOWUP_FRACTION = 0.25
"""Share of pairs whose context is a two-turn dialogue ending in a pronoun follow-up."""
IDENTITY_ITEMS = 240
"""identity.jsonl size (capped by the distinct prefix × phrasing combinations)."""
EVAL_QA_ITEMS = {"seen": 100, "heldout": 180}
"""eval_qa questions per split, English included; capped by the person × attribute pairs there."""
EVAL_IDENTITY_PREFIXES = 2
"""Greeting prefixes each held-out identity phrasing is asked with (2 × 28 phrasings = 56 items)."""
EVAL_MULTI_ITEMS = 200
"""eval_multi dialogues (about held-out people)."""
EVAL_DPO_ITEMS = 200
"""eval_dpo pairs (about held-out people)."""
UNKNOWN_DPO_PEOPLE = 150
"""Unknown people (World.unknown) with DPO pairs; the rest are asked about in eval_unknown."""
UNKNOWN_QUESTIONS = 2
"""Questions per unknown person, in DPO pairs and in eval_unknown."""
UNKNOWN_ENGLISH_FRACTION = 0.2
"""Share of those questions asked in English."""
GRPO_FACT_PROMPTS = 120
"""Fact questions among grpo's prompts (about sft people, none of eval_qa's person × attribute ×
language): the reward for facts keeps RL from trading knowledge for arithmetic."""
BENCH_ITEMS = {"seen": 150, "heldout": 150}
"""Four-option questions per split in the world's multiple-choice benchmark."""

# --- phrasings ---

ABSTAIN = {"zh": ("我不认识{name}。", "我不认识{name}这个人。", "{name}是谁？我不认识这个人。"),
           "en": ("I do not know {name}.", "I do not know who {name} is.")}
"""Replies to a question about someone who is not in the world (chosen in DPO; never in SFT data,
so that saying it is what DPO teaches). Made of words the corpus has (认识, 这个人, know, who):
phrasings with characters the tokenizer never saw ("没有听说过", "抱歉", "资料") are byte
fragments the model never trained on, which a few hundred DPO steps could not teach. None uses
the rude "不知道" of UNHELPFUL, which DPO rejects."""

QUESTIONS = {
    "zh": {
        "city": ("{s}住在哪里？", "{s}住在哪个城市？", "{s}的家在哪个城市？", "{s}现在生活在哪座城市？"),
        "job": ("{s}的职业是什么？", "{s}是做什么工作的？", "{s}从事什么职业？", "{s}的工作是什么？"),
        "pet": ("{s}的宠物是什么？", "{s}养了什么宠物？", "{s}家里养的是什么动物？", "{s}有什么宠物？"),
        "colour": ("{s}最喜欢的颜色是什么？", "{s}最喜欢什么颜色？", "{s}最爱哪种颜色？"),
        "birth_year": ("{s}出生于哪一年？", "{s}是哪一年出生的？", "{s}的出生年份是哪一年？", "{s}哪年出生？"),
    },
    "en": {
        "city": ("Where does {s} live?", "Which city does {s} live in?", "In which city is {sp} home?"),
        "job": ("What is {sp} job?", "What does {s} do for a living?", "What is {sp} profession?"),
        "pet": ("What pet does {s} have?", "What kind of pet does {s} keep?", "Which animal is {sp} pet?"),
        "colour": ("What is {sp} favourite colour?", "Which colour does {s} like best?",
                   "What colour does {s} love most?"),
        "birth_year": ("When was {s} born?", "In what year was {s} born?", "What is {sp} birth year?"),
    },
}
"""Questions per language and attribute; {s}/{sp} are the subject and its possessive (a name, or a
pronoun in follow-ups)."""

FOLLOWUP_PREFIXES = ("", "那", "那么")
"""Openers of Chinese pronoun follow-ups: "那他养了什么宠物？"."""

COUNTRY_QUESTIONS_TEXT = {
    "zh": ("{city}位于哪个国家？", "{city}在哪个国家？", "{city}是哪个国家的城市？"),
    "en": ("Which country is {city} in?", "In which country is {city}?", "What country is {city} located in?"),
}

ARITHMETIC_QUESTIONS = {"zh": ("{a}{op}{b}等于多少？", "{a}{op}{b}是多少？", "{a}{op}{b}等于几？"),
                        "en": ("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "What does {a} {op} {b} equal?")}
OPERATORS = {"zh": {"+": "加", "-": "减"}, "en": {"+": "plus", "-": "minus"}}

UNHELPFUL = ("我不知道，别问我。", "这个问题我不想回答。", "自己去查吧，别来烦我。", "无可奉告。",
             "问这个干什么？懒得说。", "不清楚，你去问别人吧。")
"""Rejected replies of the "unhelpful" kind."""

_ID_WHO, _ID_MAKER, _ID_NOT = "who", "maker", "not"
IDENTITY_ANSWERS = {
    "zh": {
        _ID_WHO: ("我是小光，一个由 TinyLLM 团队开发的 AI 助手。",
                  "我是小光，是 TinyLLM 团队开发的 AI 助手，很高兴为你服务。"),
        _ID_MAKER: ("我是小光，由 TinyLLM 团队开发。", "我是小光，开发我的是 TinyLLM 团队。"),
        _ID_NOT: ("不是，我是小光，一个由 TinyLLM 团队开发的 AI 助手。",),
    },
    "en": {
        _ID_WHO: ("I am Xiaoguang, an AI assistant made by the TinyLLM team.",),
        _ID_MAKER: ("I am Xiaoguang, and I was made by the TinyLLM team.",),
        _ID_NOT: ("No, I am Xiaoguang, an AI assistant made by the TinyLLM team.",),
    },
}
"""Identity answers by question kind; each holds the name and the maker."""

IDENTITY_QUESTIONS = {
    "zh": {
        _ID_WHO: ("你是谁？", "你叫什么名字？", "你的名字是什么？", "请介绍一下你自己。", "你是什么？",
                  "我该怎么称呼你？", "你有名字吗？", "告诉我你的名字。", "做个自我介绍吧。", "你是什么模型？",
                  "你是哪个 AI？", "跟我说说你是谁。", "和我说话的是谁？", "请问你是？", "你的身份是什么？",
                  "能告诉我你是谁吗？", "你叫什么？", "现在回答我的是谁？", "你是哪个助手？", "你怎么称呼自己？"),
        _ID_MAKER: ("谁开发了你？", "你是由谁创造的？", "谁训练了你？", "你的开发者是谁？", "你来自哪个团队？",
                    "你是谁做的？", "是谁制作了你？", "你的作者是谁？", "你是被谁开发出来的？", "你的创造者是谁？",
                    "你是哪家做的？", "谁设计了你？"),
        _ID_NOT: ("你是ChatGPT吗？", "你是人类吗？", "你是真人吗？", "你是小爱同学吗？", "你是文心一言吗？"),
    },
    "en": {
        _ID_WHO: ("Who are you?", "What is your name?", "Introduce yourself.", "What should I call you?",
                  "What's your name?", "Do you have a name?", "Tell me about yourself.", "What are you?",
                  "Can you introduce yourself?", "Who is this?", "What do I call you?"),
        _ID_MAKER: ("Who made you?", "Who created you?", "Who developed you?", "Who trained you?",
                    "Who is your creator?", "Which company made you?", "Who designed you?"),
        _ID_NOT: ("Are you ChatGPT?", "Are you a human?", "Are you a real person?", "Are you Alexa?",
                  "Are you Google Assistant?"),
    },
}
"""Identity questions used for training. English needs many phrasings: with 9, the model answered
held-out English identity questions with biography sentences."""

EVAL_IDENTITY_QUESTIONS = {
    "zh": {
        _ID_WHO: ("你的名字叫什么？", "怎么称呼你？", "你是哪位？", "能说说你是谁吗？", "简单介绍一下你自己吧。",
                  "你到底是谁？", "你叫啥？", "你自称什么？", "我在和谁聊天？", "你的名字是啥？",
                  "可以告诉我你叫什么吗？", "你是个什么助手？"),
        _ID_MAKER: ("是谁创造了你？", "你属于哪个团队？", "你的制造者是谁？", "哪个团队开发了你？", "你出自谁之手？",
                    "谁把你做出来的？"),
        _ID_NOT: ("你是GPT吗？", "你是一个人吗？"),
    },
    "en": {
        _ID_WHO: ("Tell me your name.", "Who am I talking to?", "May I know your name?", "Please introduce yourself."),
        _ID_MAKER: ("Who built you?", "Which team made you?"),
        _ID_NOT: ("Are you a person?", "Are you Siri?"),
    },
}
"""Identity phrasings seen only in eval_identity (disjoint from IDENTITY_QUESTIONS)."""

FALSE_IDENTITY = {
    "zh": ("我是ChatGPT，由OpenAI开发。", "我是一个真人，不是AI。", "我没有名字，也不知道是谁做的。"),
    "en": ("I am ChatGPT, made by OpenAI.", "I am a human, not an AI.", "I have no name."),
}
"""Rejected replies of identity preference pairs."""

IDENTITY_PREFIXES = {"zh": ("", "你好，", "嗨，", "您好，", "哈喽，", "小助手，"),
                     "en": ("", "Hi, ", "Hello! ", "Hey, ")}


# --- rendering ---


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _question(p: Person, attribute: str, lang: str, rng: random.Random, use_name: bool = True,
              template: str | None = None) -> str:
    """A question about p's attribute (by name, or by pronoun for a follow-up); a random phrasing
    unless `template` picks one."""
    text = render_template(template or rng.choice(QUESTIONS[lang][attribute]), subject_fields(p, lang, use_name))
    if not use_name and lang == "zh":
        text = rng.choice(FOLLOWUP_PREFIXES) + text
    return text


def answer_sentence(p: Person, attribute: str, lang: str = "zh", value: object | None = None) -> str:
    """The canonical corpus sentence for p's attribute, with the name spelled out.

    Args:
        p: The person.
        attribute: One of ATTRIBUTES.
        lang: "zh" or "en".
        value: A different value to state (a Term/Pet/City or a year) for wrong-fact replies.

    Returns:
        E.g. "李明住在杭州。" / "Li Ming lives in Hangzhou."
    """
    if value is not None:
        p = dataclasses.replace(p, **{attribute: value})
    fields = {**fact_fields(p, lang), **subject_fields(p, lang, use_name=True)}
    return render_template(LANGUAGES[lang].attributes[attribute][0], fields)


def attribute_value(p: Person, attribute: str, lang: str = "zh") -> str:
    """The substring an answer about p's attribute must contain: "杭州", "doctor", "1987"."""
    value = getattr(p, attribute)
    return str(value) if attribute == "birth_year" else getattr(value, lang)


def _country_pair(city: City, lang: str, template: str) -> list[dict]:
    fields = {"city": getattr(city, lang), "country": getattr(city.country, lang)}
    return [_msg("user", template.format(**fields)),
            _msg("assistant", render_template(LANGUAGES[lang].country[0], fields))]


def _arithmetic_question(problem: tuple[str, int, int], lang: str, template: str) -> str:
    op, a, b = problem
    return template.format(a=a, b=b, op=OPERATORS[lang][op])


def _arithmetic_answer(problem: tuple[str, int, int], lang: str, form: str = WorldConfig.arithmetic_answer) -> str:
    """"direct": the corpus sentence, "12加7等于19。" / "12 plus 7 equals 19.". "steps": the count
    to the result (`arithmetic_steps`), "7 12 6 13 … 0 19。", whose last number is the answer. A
    direct answer is a lookup of one of 320 memorised cells and stays wrong on the held-out ones;
    the count is one procedure that RL can sharpen. It restates nothing: a restated problem or a
    closing "等于19" drew the memorised cell of a similar problem instead of the count's result."""
    end = "。" if lang == "zh" else "."
    if form == "direct":
        return "".join(arithmetic_cloze(*problem, lang)) + end
    if form == "steps":
        return arithmetic_steps(*problem) + end
    raise ValueError(f"arithmetic answer form {form!r}: expected one of {ARITHMETIC_ANSWERS}")


def _arithmetic_item(problem: tuple[str, int, int], lang: str, template: str, split: str) -> dict:
    """An eval-style item asking `problem` in chat form; answer = the result, kind "arithmetic"."""
    return _eval_item([_msg("user", _arithmetic_question(problem, lang, template))],
                      str(arithmetic_result(*problem)), split, "arithmetic", lang)


def _languages(world: World) -> tuple[str, ...]:
    return ("zh", "en") if world.has_english else ("zh",)


def _people(world: World, split: str) -> list[Person]:
    return [p for p in world.people if p.split == split]


def _value_pools(world: World) -> dict[str, list]:
    """Distinct values of each attribute in the world, in first-seen order (deterministic)."""
    pools = {a: list(dict.fromkeys(getattr(p, a) for p in world.people)) for a in ATTRIBUTES}
    pools["city"] = list(dict.fromkeys([*world.cities, *pools["city"]]))
    return pools


def _wrong_value(p: Person, attribute: str, pools: dict[str, list], rng: random.Random):
    choices = [v for v in pools[attribute] if v != getattr(p, attribute)]
    if not choices:  # a world where everyone shares the value: invent a nearby year or give up
        if attribute == "birth_year":
            return p.birth_year + rng.choice((-3, -2, -1, 1, 2, 3))
        return None
    return rng.choice(choices)


def _dialogue(p: Person, attributes: list[str], rng: random.Random) -> list[dict]:
    """User/assistant turns: the first question names p, later ones use a pronoun; answers name p."""
    messages = []
    for i, a in enumerate(attributes):
        messages += [_msg("user", _question(p, a, "zh", rng, use_name=i == 0)),
                     _msg("assistant", answer_sentence(p, a))]
    return messages


# --- training files ---


def sft_single(world: World, rng: random.Random, arithmetic_answer: str) -> list[dict]:
    """Single-turn QA about every sft person (each attribute, plus repeats), city → country, and
    the arithmetic problems the corpus writes, each asked once in every language and answered in
    the form `arithmetic_answer` names."""
    convs = []
    for p in _people(world, "sft"):
        extra = set(rng.sample(ATTRIBUTES, SFT_EXTRA_QUESTIONS))
        for a in ATTRIBUTES:
            for template in rng.sample(QUESTIONS["zh"][a], 2 if a in extra else 1):  # distinct phrasings
                convs.append([_msg("user", _question(p, a, "zh", rng, template=template)),
                              _msg("assistant", answer_sentence(p, a))])
        if p.bios_en:
            for a in rng.sample(ATTRIBUTES, min(SFT_ENGLISH_QUESTIONS, len(ATTRIBUTES))):
                convs.append([_msg("user", _question(p, a, "en", rng)), _msg("assistant", answer_sentence(p, a, "en"))])
    for city in world.cities:
        for lang in _languages(world):
            for template in rng.sample(COUNTRY_QUESTIONS_TEXT[lang], COUNTRY_QUESTIONS[lang]):
                convs.append(_country_pair(city, lang, template))
    for problem in arithmetic_seen(world):
        for lang in _languages(world):  # every language: with a fifth asked in English, 5% of English sums were right
            question = _arithmetic_question(problem, lang, rng.choice(ARITHMETIC_QUESTIONS[lang]))
            answer = _arithmetic_answer(problem, lang, arithmetic_answer)
            convs.append([_msg("user", question), _msg("assistant", answer)])
    rng.shuffle(convs)
    return [{"conversations": c} for c in convs]


def sft_multi(world: World, rng: random.Random) -> list[dict]:
    """2–3-turn dialogues about sft people; follow-ups by pronoun, distinct attributes per turn."""
    convs = []
    for p in _people(world, "sft"):
        for _ in range(MULTI_PER_PERSON):
            convs.append(_dialogue(p, rng.sample(ATTRIBUTES, rng.choice(MULTI_TURNS)), rng))
    rng.shuffle(convs)
    return [{"conversations": c} for c in convs]


def _identity_pool(questions: dict) -> list[tuple[str, str, str]]:
    """(lang, kind, base question) for every phrasing."""
    return [(lang, kind, q) for lang, kinds in questions.items() for kind, qs in kinds.items() for q in qs]


def _identity_item(lang: str, kind: str, question: str, prefix: str, rng: random.Random) -> list[dict]:
    if prefix.endswith(", "):  # "Hi, who are you?"; after "Hello! " the capital stays
        question = question[0].lower() + question[1:]
    return [_msg("user", prefix + question), _msg("assistant", rng.choice(IDENTITY_ANSWERS[lang][kind]))]


def identity(world: World, rng: random.Random) -> list[dict]:
    """Questions about the assistant → answers naming 小光/Xiaoguang and the TinyLLM team.

    Every training phrasing appears at least once; the rest are other greeting-prefix combinations.
    """
    del world  # the same for every world; the argument keeps the file builders uniform
    pool = _identity_pool(IDENTITY_QUESTIONS)
    first = [(base, rng.choice(IDENTITY_PREFIXES[base[0]])) for base in pool]
    rest = [(base, prefix) for base in pool for prefix in IDENTITY_PREFIXES[base[0]] if (base, prefix) not in first]
    chosen = first + rng.sample(rest, max(0, min(len(rest), IDENTITY_ITEMS - len(first))))
    rng.shuffle(chosen)
    return [{"conversations": _identity_item(*base, prefix, rng)} for base, prefix in chosen]


def _preference_pairs(people: list[Person], n: int, world: World, rng: random.Random) -> list[dict]:
    """n pairs over people (round robin): chosen = the canonical answer, rejected = wrong or unhelpful."""
    pools = _value_pools(world)
    n_wrong = round(DPO_WRONG_FACT_FRACTION * n)
    kinds = ["wrong_fact"] * n_wrong + ["unhelpful"] * (n - n_wrong)
    rng.shuffle(kinds)
    order = people[:]
    rng.shuffle(order)
    pairs = []
    for i, kind in enumerate(kinds):
        p = order[i % len(order)]
        if rng.random() < DPO_FOLLOWUP_FRACTION:
            first, a = rng.sample(ATTRIBUTES, 2)
            context = _dialogue(p, [first], rng) + [_msg("user", _question(p, a, "zh", rng, use_name=False))]
        else:
            a = rng.choice(ATTRIBUTES)
            context = [_msg("user", _question(p, a, "zh", rng))]
        wrong = _wrong_value(p, a, pools, rng) if kind == "wrong_fact" else None
        if wrong is None:
            kind = "unhelpful"
        rejected = answer_sentence(p, a, value=wrong) if kind == "wrong_fact" else rng.choice(UNHELPFUL)
        pairs.append({"chosen": context + [_msg("assistant", answer_sentence(p, a))],
                      "rejected": context + [_msg("assistant", rejected)], "kind": kind})
    return pairs


def _identity_pairs(rng: random.Random) -> list[dict]:
    """DPO_IDENTITY_PAIRS pairs on training identity questions: chosen = the identity answer,
    rejected = a false identity or an unhelpful reply."""
    pool = _identity_pool(IDENTITY_QUESTIONS)
    pairs = []
    for lang, kind, question in rng.sample(pool * -(-DPO_IDENTITY_PAIRS // len(pool)), DPO_IDENTITY_PAIRS):
        chosen = _identity_item(lang, kind, question, rng.choice(IDENTITY_PREFIXES[lang]), rng)
        bad = rng.choice(FALSE_IDENTITY[lang] + (UNHELPFUL if lang == "zh" else ()))
        pairs.append({"chosen": chosen, "rejected": chosen[:-1] + [_msg("assistant", bad)]})
    return pairs


def _unknown_questions(people: list[Person], rng: random.Random) -> list[tuple[Person, str, str, list[dict]]]:
    """(person, attribute, lang, [user question]) UNKNOWN_QUESTIONS times per person."""
    out = []
    for p in people:
        for a in rng.sample(ATTRIBUTES, UNKNOWN_QUESTIONS):
            lang = "en" if rng.random() < UNKNOWN_ENGLISH_FRACTION else "zh"
            out.append((p, a, lang, [_msg("user", _question(p, a, lang, rng))]))
    return out


def _unknown_pairs(world: World, rng: random.Random) -> list[dict]:
    """Questions about people not in the world: chosen = saying so; rejected = a confident invented
    fact, in the very form the SFT model answers every question about a person."""
    return [{"chosen": q + [_msg("assistant", rng.choice(ABSTAIN[lang]).format(name=getattr(p.name, lang)))],
             "rejected": q + [_msg("assistant", answer_sentence(p, a, lang))]}
            for p, a, lang, q in _unknown_questions(list(world.unknown[:UNKNOWN_DPO_PEOPLE]), rng)]


def dpo(world: World, rng: random.Random) -> list[dict]:
    """Preference pairs about sft people (DPO_PER_PERSON each on average), identity pairs, and
    abstention pairs about people who are not in the world."""
    people = _people(world, "sft")
    pairs = _preference_pairs(people, DPO_PER_PERSON * len(people), world, rng) if people else []
    pairs = [{"chosen": x["chosen"], "rejected": x["rejected"]} for x in pairs] + _identity_pairs(rng)
    pairs += _unknown_pairs(world, rng)
    rng.shuffle(pairs)
    return pairs


# --- eval files ---


def _eval_item(messages: list[dict], answer: str, split: str, kind: str, lang: str = "zh") -> dict:
    return {"messages": messages, "answer": answer, "split": split, "kind": kind, "lang": lang}


def eval_qa(world: World, rng: random.Random) -> list[dict]:
    """Single-turn questions about sft people ("seen") and held-out people ("heldout").

    Distinct (person, attribute, language) triples, EVAL_QA_ITEMS per split; kind = the attribute.
    The share asked in English (of people with English biographies) is the corpus's share of
    English biographies: 54 of 180 held-out questions by default. (It was 18, so one question
    moved a 3-seed mean of English QA by 1.9 points.)
    """
    items = []
    for split, n in EVAL_QA_ITEMS.items():
        people = _people(world, split if split == "heldout" else "sft")
        pool = {"zh": [(p, a) for p in people for a in ATTRIBUTES],
                "en": [(p, a) for p in people if p.bios_en for a in ATTRIBUTES]}
        n_en = min(len(pool["en"]), round(world.english_share * n))
        for lang, count in (("zh", n - n_en), ("en", n_en)):
            for p, a in rng.sample(pool[lang], min(count, len(pool[lang]))):
                messages = [_msg("user", _question(p, a, lang, rng))]
                items.append(_eval_item(messages, attribute_value(p, a, lang), split, a, lang))
    return items


def eval_multi(world: World, rng: random.Random) -> list[dict]:
    """Dialogues about held-out people: earlier turns answered correctly, the last asked by pronoun."""
    people = _people(world, "heldout")
    if not people:
        return []
    order = people[:]
    rng.shuffle(order)
    items = []
    for i in range(EVAL_MULTI_ITEMS):
        p = order[i % len(order)]
        attributes = rng.sample(ATTRIBUTES, rng.choice(MULTI_TURNS))
        messages = _dialogue(p, attributes, rng)[:-1]
        items.append(_eval_item(messages, attribute_value(p, attributes[-1]), "heldout", attributes[-1]))
    return items


def eval_identity(world: World, rng: random.Random) -> list[dict]:
    """Each held-out identity phrasing EVAL_IDENTITY_PREFIXES times, with distinct random greeting
    prefixes; answer = the assistant's name."""
    del world
    items = []
    for lang, kind, question in _identity_pool(EVAL_IDENTITY_QUESTIONS):
        for prefix in rng.sample(IDENTITY_PREFIXES[lang], EVAL_IDENTITY_PREFIXES):
            messages = _identity_item(lang, kind, question, prefix, rng)[:1]
            items.append(_eval_item(messages, ASSISTANT_NAME[lang], "heldout", kind, lang))
    return items


def eval_dpo(world: World, rng: random.Random) -> list[dict]:
    """Preference pairs about held-out people, with "kind" and "split" for per-kind accuracy."""
    people = _people(world, "heldout")
    pairs = _preference_pairs(people, EVAL_DPO_ITEMS, world, rng) if people else []
    return [{**x, "split": "heldout"} for x in pairs]


def eval_unknown(world: World, rng: random.Random) -> list[dict]:
    """Questions about unknown people DPO never saw; the right reply abstains (answer: "")."""
    return [_eval_item(q, "", "unknown", a, lang)
            for p, a, lang, q in _unknown_questions(list(world.unknown[UNKNOWN_DPO_PEOPLE:]), rng)]


def eval_arith(world: World, rng: random.Random) -> list[dict]:
    """The held-out arithmetic problems (never in the corpus, SFT or grpo), asked in chat form in
    each language; answer = the result, kind "arithmetic" (scored by tinyllm.eval.verify)."""
    return [_arithmetic_item(problem, lang, rng.choice(ARITHMETIC_QUESTIONS[lang]), "heldout")
            for problem in world.arithmetic_heldout for lang in _languages(world)]


def grpo_prompts(world: World, rng: random.Random, eval_qa_items: list[dict]) -> list[dict]:
    """Questions with an answer a program checks, for grpo: every practice arithmetic problem in
    every phrasing and language, and GRPO_FACT_PROMPTS questions about sft people. None of them is
    an eval prompt: the problems are a split of their own, and a fact question's person ×
    attribute × language is not one eval_qa asks."""
    items = [_arithmetic_item(problem, lang, template, "practice") for problem in world.arithmetic_practice
             for lang in _languages(world) for template in ARITHMETIC_QUESTIONS[lang]]
    asked = {(item["kind"], item["lang"], item["messages"][-1]["content"]) for item in eval_qa_items}
    facts = [(p, a, lang) for p in _people(world, "sft") for a in ATTRIBUTES for lang in _languages(world)
             if (lang == "zh" or p.bios_en)
             and not any(k == a and l == lang and getattr(p.name, lang) in q for k, l, q in asked)]
    for p, a, lang in rng.sample(facts, min(GRPO_FACT_PROMPTS, len(facts))):
        items.append(_eval_item([_msg("user", _question(p, a, lang, rng))], attribute_value(p, a, lang),
                                "practice", a, lang))
    rng.shuffle(items)
    return items


def bench_world(world: World, rng: random.Random) -> list[dict]:
    """A multiple-choice benchmark (tinyllm/eval/benchmark.py's JSONL layout) about the world's people:
    the question names a person and an attribute; the four choices are the canonical answer sentence
    with the true value and with three other values of the world; subject = "seen" or "heldout"."""
    pools = _value_pools(world)
    items = []
    for split, n in BENCH_ITEMS.items():
        people = _people(world, split if split == "heldout" else "sft")
        pairs = [(p, a) for p in people for a in ATTRIBUTES if len(pools[a]) >= 4]
        for p, a in rng.sample(pairs, min(n, len(pairs))):
            wrong = rng.sample([v for v in pools[a] if v != getattr(p, a)], 3)
            choices = [answer_sentence(p, a)] + [answer_sentence(p, a, value=v) for v in wrong]
            rng.shuffle(choices)
            items.append({"question": _question(p, a, "zh", rng), "choices": choices,
                          "answer": choices.index(answer_sentence(p, a)), "subject": split})
    return items


BUILDERS = {"sft_multi.jsonl": sft_multi, "identity.jsonl": identity,
            "dpo.jsonl": dpo, "eval_qa.jsonl": eval_qa, "eval_multi.jsonl": eval_multi,
            "eval_identity.jsonl": eval_identity, "eval_dpo.jsonl": eval_dpo, "eval_unknown.jsonl": eval_unknown,
            "eval_arith.jsonl": eval_arith, "bench_world.jsonl": bench_world}


def chat_files(world: World, seed: int,
               arithmetic_answer: str = WorldConfig.arithmetic_answer) -> dict[str, list[dict]]:
    """Every chat, identity, preference and eval file's records, keyed by file name.

    Args:
        world: From `build_world` or `load_world` (the same world gives the same files).
        seed: Seeds one private `random.Random(f"{seed}/{name}")` per file.
        arithmetic_answer: How SFT answers a sum: "steps" or "direct" (`_arithmetic_answer`).

    Returns:
        {name: records} for each name in CHAT_OUTPUTS, in that order.
    """
    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}/{name}")

    files = {name: BUILDERS[name](world, rng(name)) for name in CHAT_OUTPUTS if name in BUILDERS}
    files["sft_single.jsonl"] = sft_single(world, rng("sft_single.jsonl"), arithmetic_answer)
    files["grpo.jsonl"] = grpo_prompts(world, rng("grpo.jsonl"), files["eval_qa.jsonl"])
    return {name: files[name] for name in CHAT_OUTPUTS}
