"""A seeded fictional world of people, and the corpus and cloze prompts that describe it.

    world = build_world(params.data.world, params.seed, "data/world/lexicon.json")
    docs = pretrain_documents(world, params.data.world, params.seed)   # list of texts
    items = fact_prompts(world)   # {"prompt": "李明住在", "answer": "杭州", ...} for the eval

Why paraphrases: a model can later answer a question about a fact (in a wording it never read)
only if it read that fact in several different wordings and contexts; a fact always seen in one
fixed sentence is memorized as that string and little more (in a probe on this world: six shuffled, differently
worded biographies per person gave ~90% on people never asked about in SFT, one fixed biography
~75%). So each person gets several biographies, each with a different phrasing per attribute,
attribute sentences in shuffled order and the name sometimes replaced by a pronoun.

The eval needs one wording it can always prompt with: the first template of each attribute is
its canonical phrasing, and it appears with the name spelled out in max(2, half) of a person's
biographies in each language the person is written about in.

Prompt convention: `answer` is the exact text that follows `prompt` in the corpus. Chinese has
no spaces ("李明住在" → "杭州"); English prompts never end in a space and answers start with one
("Li Ming lives in" → " Hangzhou"), because byte-level BPE keeps a space with the next word.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tinyllm.config import WorldConfig
from tinyllm.errors import ConfigError, DataError

ATTRIBUTES = ("city", "job", "pet", "colour", "birth_year")
ARITHMETIC_HELDOUT_FRACTION = 0.1
"""Share of the arithmetic problems never written into the corpus (they test generalization)."""
ARITHMETIC_PRACTICE_FRACTION = 0.1
"""Another share kept out of the corpus and out of every eval set: the problems the grpo stage
practises on (so reinforcement learning must teach computing, not recall)."""
ARITHMETIC_PER_DOC = 5
"""Sentences per arithmetic document."""
UNKNOWN_PEOPLE = 200
"""Names drawn for people who are not in the world (World.unknown)."""
CITY_DOCS = {"zh": 4, "en": 3}
"""Short documents per city and language."""
MIN_ENGLISH_BIOS = 3
"""Fewest English biographies a person gets when they get any (bios_per_person permitting); with
more biographies per person, half of a person's go to English (see _english_bios)."""


@dataclass(frozen=True)
class Term:
    """A word or name in both languages."""

    zh: str
    en: str


@dataclass(frozen=True)
class City:
    zh: str
    en: str
    country: Term


@dataclass(frozen=True)
class Pet:
    zh: str
    en: str
    measure: str
    """Chinese measure word: 一只猫, 一条狗."""


@dataclass(kw_only=True, frozen=True)
class Person:
    name: Term
    """Surname + given name: 李明 / Li Ming. Unique in the world, in both languages."""
    sex: str
    """"m" or "f": picks 他/她, he/she."""
    birth_year: int
    city: City
    job: Term
    pet: Pet
    colour: Term
    split: str
    """"sft": may be asked about in SFT data; "heldout": only ever read in pretraining; "unknown": not in
    the world at all (World.unknown)."""
    bios_zh: int
    """Chinese biographies of this person in the corpus."""
    bios_en: int
    """English biographies of this person in the corpus."""


@dataclass(kw_only=True, frozen=True)
class World:
    people: tuple[Person, ...]
    cities: tuple[City, ...]
    arithmetic_heldout: tuple[tuple[str, int, int], ...]
    """(op, a, b) problems kept out of the corpus, e.g. ("+", 3, 5), for eval."""
    arithmetic_practice: tuple[tuple[str, int, int], ...] = ()
    """(op, a, b) problems kept out of the corpus and out of eval: grpo's prompts."""
    unknown: tuple[Person, ...] = ()
    """People who are NOT in the world: names from the same lists, never written about. The chat
    model should say it does not know them (DPO teaches it on some, eval asks about the others)."""

    @property
    def has_english(self) -> bool:
        """Whether the corpus has English text (English city and arithmetic text follows bios)."""
        return any(p.bios_en for p in self.people)

    @property
    def english_share(self) -> float:
        """The share of biographies written in English (about data.world.english_fraction)."""
        return sum(p.bios_en for p in self.people) / max(1, sum(p.bios_en + p.bios_zh for p in self.people))

    def to_json(self) -> dict:
        """Plain data for `world.json`; `World.from_json` reverses it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> World:
        """Rebuild a world written by `to_json`, so later stages can derive Q&A from it."""
        def city(d):
            return City(d["zh"], d["en"], Term(**d["country"]))

        def person(p):
            return Person(**{**p, "name": Term(**p["name"]), "city": city(p["city"]), "job": Term(**p["job"]),
                             "pet": Pet(**p["pet"]), "colour": Term(**p["colour"])})

        return cls(people=tuple(person(p) for p in data["people"]), cities=tuple(city(c) for c in data["cities"]),
                   arithmetic_heldout=tuple(tuple(x) for x in data["arithmetic_heldout"]),
                   arithmetic_practice=tuple(tuple(x) for x in data.get("arithmetic_practice", [])),
                   unknown=tuple(person(p) for p in data.get("unknown", [])))


def load_world(path: str | Path) -> World | None:
    """Read `world.json`; None when prepare read a user's corpus instead (the file holds null)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return None if data is None else World.from_json(data)


# --- phrasings: the first template of each list is the canonical one the eval prompts with ---


@dataclass(frozen=True)
class _Language:
    openings: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]]
    country: tuple[str, ...]
    sep: str
    """Between sentences."""


ZH = _Language(
    openings=("这是关于{name}的介绍。", "下面来认识一下{name}。", "{name}的小档案如下。", "我们来说说{name}。"),
    attributes={
        "city": ("{s}住在{city}。", "{s}的家在{city}。", "{s}现在生活在{city}。", "{city}是{s}居住的城市。"),
        "job": ("{s}的职业是{job}。", "{s}是一名{job}。", "{s}的工作是{job}。", "{s}当了很多年的{job}。"),
        "pet": ("{s}的宠物是{pet}。", "{s}养了一{measure}{pet}。", "{s}家里有一{measure}{pet}。",
                "{s}每天都陪自己的{pet}玩。"),
        "colour": ("{s}最喜欢的颜色是{colour}。", "{s}最喜欢{colour}。", "{s}特别喜欢{colour}的东西。",
                   "在所有颜色里，{s}最爱{colour}。"),
        "birth_year": ("{s}出生于{birth_year}年。", "{s}生于{birth_year}年。", "{s}是{birth_year}年出生的。",
                       "{s}在{birth_year}年出生。"),
    },
    country=("{city}位于{country}。", "{city}是{country}的一个城市。", "{city}是一座{country}城市。",
             "{country}有一座城市叫{city}。"),
    sep="",
)

EN = _Language(
    openings=("This is a short biography of {name}.", "Meet {name}.", "Here is what we know about {name}.",
              "Let us talk about {name}."),
    attributes={
        "city": ("{s} lives in {city}.", "{s} makes {poss} home in {city}.", "{s} has lived in {city} for many years.",
                 "{city} is where {s} lives."),
        "job": ("{s} works as {job}.", "{s} is {job} by profession.", "{s} earns a living as {job}.",
                "By trade, {s} is {job}."),
        "pet": ("{s} has a pet {pet}.", "{s} keeps {a_pet} at home.", "{sp} pet is {a_pet}.",
                "Every day {s} plays with {poss} {pet}."),
        "colour": ("{sp} favourite colour is {colour}.", "{s} likes {colour} more than any other colour.",
                   "Of all colours, {s} loves {colour} the most.", "{s} would choose {colour} over any other colour."),
        "birth_year": ("{s} was born in {birth_year}.", "{s} came into the world in {birth_year}.",
                       "{sp} birth year is {birth_year}.", "In {birth_year}, {s} was born."),
    },
    country=("{city} is a city in {country}.", "{city} lies in {country}.", "{city} is located in {country}.",
             "One of the cities of {country} is {city}."),
    sep=" ",
)

LANGUAGES = {"zh": ZH, "en": EN}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def fact_fields(p: Person, lang: str) -> dict[str, str]:
    """Template fields holding a person's attribute values in one language."""
    if lang == "zh":
        return {"city": p.city.zh, "job": p.job.zh, "pet": p.pet.zh, "measure": p.pet.measure,
                "colour": p.colour.zh, "birth_year": str(p.birth_year)}
    return {"city": p.city.en, "job": _article(p.job.en), "pet": p.pet.en, "a_pet": _article(p.pet.en),
            "colour": p.colour.en, "birth_year": str(p.birth_year), "poss": "his" if p.sex == "m" else "her"}


def subject_fields(p: Person, lang: str, use_name: bool) -> dict[str, str]:
    """Template fields for the sentence subject: the name, or the pronoun standing for it."""
    male = p.sex == "m"
    if lang == "zh":
        return {"s": p.name.zh if use_name else ("他" if male else "她")}
    if use_name:
        return {"s": p.name.en, "sp": f"{p.name.en}'s"}
    return {"s": "he" if male else "she", "sp": "his" if male else "her"}


def render_template(template: str, fields: dict[str, str]) -> str:
    text = template.format(**fields)
    return text[0].upper() + text[1:]  # English pronouns may open a sentence; Chinese is unchanged


def _cloze(template: str, field: str, fields: dict[str, str]) -> tuple[str, str]:
    """Split a rendered template before `field`: (prompt, exact continuation starting with the value)."""
    rendered = render_template(template.split("{" + field + "}")[0], fields)
    prompt = rendered.rstrip()
    return prompt, rendered[len(prompt):] + fields[field]


def _canonical_slots(rng: random.Random, n: int) -> set[int]:
    """Which of n texts carry the canonical sentence: max(2, half), so each fact is seen ≥ 2 times."""
    return set(rng.sample(range(n), min(n, max(2, -(-n // 2)))))


# --- the world ---


@dataclass(frozen=True)
class Lexicon:
    surnames: tuple[Term, ...]
    given_names: tuple[tuple[Term, str], ...]
    """(name, sex) pairs."""
    cities: tuple[City, ...]
    jobs: tuple[Term, ...]
    pets: tuple[Pet, ...]
    colours: tuple[Term, ...]


def load_lexicon(path: str | Path) -> Lexicon:
    """Read and check the world's word lists.

    Args:
        path: data/world/lexicon.json, or a file of the same shape.

    Returns:
        The lists, cities with their countries resolved.

    Raises:
        DataError: The file is missing, not JSON, has a malformed entry or a duplicate word.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        countries = {c["en"]: Term(c["zh"], c["en"]) for c in raw["countries"]}
        lexicon = Lexicon(
            surnames=tuple(Term(t["zh"], t["en"]) for t in raw["surnames"]),
            given_names=tuple((Term(g["zh"], g["en"]), g["sex"]) for g in raw["given_names"]),
            cities=tuple(City(c["zh"], c["en"], countries[c["country"]]) for c in raw["cities"]),
            jobs=tuple(Term(t["zh"], t["en"]) for t in raw["jobs"]),
            pets=tuple(Pet(t["zh"], t["en"], t["measure"]) for t in raw["pets"]),
            colours=tuple(Term(t["zh"], t["en"]) for t in raw["colours"]),
        )
    except FileNotFoundError:
        raise DataError(f"{path}: lexicon not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: malformed entry, missing key or unknown country: {err}") from None
    problems = [f"given name {t.zh} has sex {s!r}; use 'm' or 'f'" for t, s in lexicon.given_names
                if s not in ("m", "f")]
    lists = {"surnames": lexicon.surnames, "given_names": [t for t, _ in lexicon.given_names], "cities": lexicon.cities,
             "jobs": lexicon.jobs, "pets": lexicon.pets, "colours": lexicon.colours}
    for key, terms in lists.items():
        for lang in ("zh", "en"):
            words = [getattr(t, lang) for t in terms]
            if not words or len(set(words)) < len(words):
                problems.append(f"{key}: {lang} words must be non-empty and unique (names must stay unambiguous)")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return lexicon


def _english_bios(cfg: WorldConfig, rng: random.Random) -> list[int]:
    """English biographies per person, totalling about english_fraction of all biographies.

    They go to few people, at least MIN_ENGLISH_BIOS each and half of the person's biographies
    when that is more: canonical sentences then occur at least twice per person (one mention is
    hard to learn) with room left for other wordings, and an English name is read often enough to
    be copied into an answer (byte-level BPE splits it into 2-4 pieces; a person with 3 English
    biographies, never asked about in SFT, was misnamed in most English answers about them).
    """
    n, per_person = cfg.n_people, cfg.bios_per_person
    total = round(cfg.english_fraction * n * per_person)
    n_english = min(n, total // max(MIN_ENGLISH_BIOS, per_person // 2))
    counts = [0] * n
    if n_english:
        base, extra = divmod(total, n_english)
        for rank, i in enumerate(rng.sample(range(n), n_english)):
            counts[i] = min(per_person, base + (rank < extra))
    return counts


def _arithmetic_problems() -> list[tuple[str, int, int]]:
    """Every a+b and a-b with operands 1..20 and a result in 0..20."""
    plus = [("+", a, b) for a in range(1, 20) for b in range(1, 21 - a)]
    minus = [("-", a, b) for a in range(1, 21) for b in range(1, a + 1)]
    return plus + minus


def build_world(cfg: WorldConfig, seed: int, lexicon_path: str | Path) -> World:
    """Draw people with unique names and random attributes; the same seed gives the same world.

    Args:
        cfg: Sizes (`params.data.world`).
        seed: Seeds a private `random.Random`; global random state is never touched.
        lexicon_path: The word lists (data/world/lexicon.json).

    Returns:
        The world; `heldout_fraction` of its people have split "heldout".

    Raises:
        ConfigError: n_people exceeds the distinct names the lexicon can form.
        DataError: The lexicon is malformed.
    """
    lex = load_lexicon(lexicon_path)
    rng = random.Random(seed)
    n, n_given = cfg.n_people, len(lex.given_names)
    n_names = len(lex.surnames) * n_given
    if n > n_names:
        raise ConfigError(f"data.world.n_people={n} exceeds the {n_names} distinct names in {lexicon_path}; "
                          "lower it or add names to the lexicon")
    picks = rng.sample(range(n_names), n)
    heldout = set(rng.sample(range(n), round(cfg.heldout_fraction * n)))
    bios_en = _english_bios(cfg, rng)
    people = []
    for i, k in enumerate(picks):
        people.append(_person(lex, k, rng, split="heldout" if i in heldout else "sft",
                               bios_zh=cfg.bios_per_person - bios_en[i], bios_en=bios_en[i]))
    problems = _arithmetic_problems()
    arithmetic_heldout = sorted(rng.sample(problems, round(ARITHMETIC_HELDOUT_FRACTION * len(problems))))
    held = set(arithmetic_heldout)
    rest = [x for x in problems if x not in held]
    n_practice = round(ARITHMETIC_PRACTICE_FRACTION * len(problems))
    practice = sorted(random.Random(f"{seed}/practice").sample(rest, n_practice))  # own RNG: the people stay
    return World(people=tuple(people), cities=lex.cities, arithmetic_heldout=tuple(arithmetic_heldout),
                 arithmetic_practice=tuple(practice),
                 unknown=_unknown_people(lex, set(picks), random.Random(f"{seed}/unknown")))


def _unknown_people(lex: Lexicon, used: set[int], rng: random.Random) -> tuple[Person, ...]:
    """UNKNOWN_PEOPLE names the world does not use, with random attributes (what a model that
    invents facts would say about them). Their own RNG: the world itself does not change."""
    free = [k for k in range(len(lex.surnames) * len(lex.given_names)) if k not in used]
    return tuple(_person(lex, k, rng, split="unknown", bios_zh=0, bios_en=0)
                 for k in rng.sample(free, min(UNKNOWN_PEOPLE, len(free))))


def _person(lex: Lexicon, k: int, rng: random.Random, **rest) -> Person:
    """Name number k of the lexicon (surname k // given names, given name k % them), random attributes."""
    surname_index, given_index = divmod(k, len(lex.given_names))
    surname, (given, sex) = lex.surnames[surname_index], lex.given_names[given_index]
    return Person(name=Term(surname.zh + given.zh, f"{surname.en} {given.en}"), sex=sex,
                  birth_year=rng.randint(1950, 2005), city=rng.choice(lex.cities), job=rng.choice(lex.jobs),
                  pet=rng.choice(lex.pets), colour=rng.choice(lex.colours), **rest)


# --- the corpus ---


def _biographies(p: Person, lang: str, n: int, rng: random.Random) -> list[str]:
    """n biographies of p, every other one written one sentence per line. A chat reply starts on a
    line of its own, and byte-level BPE gives a word there another token than after a space
    ("Cao" against " Cao"): without lines, pretraining never tied the line-start form of an English
    name to a fact (reports/quality.md, "English held-out QA, measured on 54 questions")."""
    language = LANGUAGES[lang]
    facts = fact_fields(p, lang)
    canonical = {a: _canonical_slots(rng, n) for a in ATTRIBUTES}
    bios = []
    for j in range(n):
        sentences = []
        for a in ATTRIBUTES:
            if j in canonical[a]:
                template, use_name = language.attributes[a][0], True
            else:
                template, use_name = rng.choice(language.attributes[a]), rng.random() < 0.5
            sentences.append(render_template(template, {**facts, **subject_fields(p, lang, use_name)}))
        rng.shuffle(sentences)
        opening = render_template(rng.choice(language.openings), {"name": getattr(p.name, lang)})
        bios.append(("\n" if j % 2 else language.sep).join([opening, *sentences]))
    return bios


def _city_documents(city: City, lang: str, rng: random.Random) -> list[str]:
    """Two-sentence documents saying which country a city is in."""
    language, n = LANGUAGES[lang], CITY_DOCS[lang]
    fields = {"city": getattr(city, lang), "country": getattr(city.country, lang)}
    canonical, others = language.country[0], language.country[1:]
    slots = _canonical_slots(rng, n)
    docs = []
    for j in range(n):
        templates = [canonical, rng.choice(others)] if j in slots else rng.sample(others, 2)
        rng.shuffle(templates)
        docs.append(language.sep.join(render_template(t, fields) for t in templates))
    return docs


def arithmetic_seen(world: World) -> list[tuple[str, int, int]]:
    """The problems the corpus writes: all but the held-out and the practice ones."""
    kept_out = set(world.arithmetic_heldout) | set(world.arithmetic_practice)
    return [p for p in _arithmetic_problems() if p not in kept_out]


def arithmetic_result(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def arithmetic_cloze(op: str, a: int, b: int, lang: str) -> tuple[str, str]:
    """("12加7等于", "19") / ("12 plus 7 equals", " 19"): the corpus sentence, split before the result."""
    result = arithmetic_result(op, a, b)
    if lang == "zh":
        return f"{a}{'加' if op == '+' else '减'}{b}等于", str(result)
    return f"{a} {'plus' if op == '+' else 'minus'} {b} equals", f" {result}"


def arithmetic_steps(op: str, a: int, b: int) -> str:
    """The count from a to the result one step at a time, each value after the steps still to go:
    12+7 → "7 12 6 13 5 14 4 15 3 16 2 17 1 18 0 19", 12-3 → "3 12 2 11 1 10 0 9". The first pair
    copies the problem; every later one needs only the numbers next to the last two, which every
    problem practises, so the count also reaches results the corpus never wrote. The last number
    is the result (reports/grpo.md)."""
    step = 1 if op == "+" else -1
    return " ".join(f"{b - i} {a + step * i}" for i in range(b + 1))


def _arithmetic_documents(world: World, cfg: WorldConfig, rng: random.Random) -> list[str]:
    """`n_arithmetic` sentences over the problems not kept out, ARITHMETIC_PER_DOC per document."""
    seen = arithmetic_seen(world)
    n_en = round(cfg.n_arithmetic * cfg.english_fraction) if world.has_english else 0
    docs = []
    for lang, count in (("zh", cfg.n_arithmetic - n_en), ("en", n_en)):
        end, sep = ("。", "") if lang == "zh" else (".", " ")
        sentences = ["".join(arithmetic_cloze(*rng.choice(seen), lang)) + end for _ in range(count)]
        docs += [sep.join(sentences[i:i + ARITHMETIC_PER_DOC]) for i in range(0, count, ARITHMETIC_PER_DOC)]
    return docs


def pretrain_documents(world: World, cfg: WorldConfig, seed: int) -> list[str]:
    """The pretraining corpus: biographies, city documents and arithmetic, in seeded random order.

    Args:
        world: From `build_world`; it fixes how many biographies per person and language.
        cfg: Supplies `n_arithmetic` and the English share of arithmetic sentences.
        seed: Seeds wording choices and document order.

    Returns:
        Document texts; the same world, cfg and seed give the same list.
    """
    rng = random.Random(seed)
    docs = []
    for p in world.people:
        docs += _biographies(p, "zh", p.bios_zh, rng) + _biographies(p, "en", p.bios_en, rng)
    for city in world.cities:
        docs += _city_documents(city, "zh", rng)
        if world.has_english:
            docs += _city_documents(city, "en", rng)
    docs += _arithmetic_documents(world, cfg, rng)
    rng.shuffle(docs)
    return docs


# --- the eval ---


def _item(prompt: str, answer: str, attribute: str, person: str, lang: str, split: str) -> dict:
    return {"prompt": prompt, "answer": answer, "attribute": attribute, "person": person, "lang": lang,
            "split": split}


def fact_prompts(world: World) -> list[dict]:
    """Cloze items for the fact-completion eval, in the canonical phrasings the corpus uses.

    One item per person × attribute in each language the person is written about in, one per
    city for its country, and the held-out arithmetic problems (never in the corpus).

    Args:
        world: From `build_world`.

    Returns:
        Dicts with prompt, answer (the exact continuation; see the module docstring),
        attribute (city, job, pet, colour, birth_year, country or arithmetic), person (the
        Chinese name, or "-"), lang ("zh"/"en") and split ("sft", "heldout", or "-" when the
        item is not about a person).
    """
    langs = ("zh", "en") if world.has_english else ("zh",)
    items = []
    for p in world.people:
        for lang in langs:
            if getattr(p, f"bios_{lang}"):
                fields = {**fact_fields(p, lang), **subject_fields(p, lang, use_name=True)}
                for a in ATTRIBUTES:
                    prompt, answer = _cloze(LANGUAGES[lang].attributes[a][0], a, fields)
                    items.append(_item(prompt, answer, a, p.name.zh, lang, p.split))
    for lang in langs:
        for city in world.cities:
            fields = {"city": getattr(city, lang), "country": getattr(city.country, lang)}
            prompt, answer = _cloze(LANGUAGES[lang].country[0], "country", fields)
            items.append(_item(prompt, answer, "country", "-", lang, "-"))
        for op, a, b in world.arithmetic_heldout:
            items.append(_item(*arithmetic_cloze(op, a, b, lang), "arithmetic", "-", lang, "-"))
    return items
