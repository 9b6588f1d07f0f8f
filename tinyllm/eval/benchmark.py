"""Multiple-choice benchmarks on any model: C-Eval / CMMLU CSV files or JSON Lines, scored by likelihood.

    tests, dev = read_benchmark(Path("data/benchmarks/example"))        # {subject: [Question]}
    scores = choice_scores(model, tok, tests["geography"], chat=True, shots={"geography": dev["geography"][:k]})
    result = run_benchmark(model, tok, Path("data/benchmarks/example"), chat=True, shots=0, max_items=300, seed=0)

Layouts read (`eval.benchmarks` names files or folders of them):
- CSV, one file per subject, a header with `question,A,B,C,D,answer` (any case; C-Eval's `id` and
  CMMLU's unnamed index column are ignored); the answer is a letter.
- JSON Lines: `{"question": ..., "choices": [...], "answer": 0 or "A", "subject": optional}`.
A file's subject is its name without `_dev`/`_val`/`_test`; files in a `dev` folder or named
`*_dev.*` are the few-shot examples for their subject (eval.shots of them go before each question).
A CSV with no answer column (C-Eval's `test/` split keeps its answers secret) is skipped with a warning.

Scoring: each choice is appended to the question as a continuation, and the model picks the choice
with the highest mean log-probability per token (the mean, so a longer choice is not penalised for
its length). A chat model gets the question as a user turn and the choice as its reply (ChatML,
`<|im_end|>` included); the pretrained model gets `question\\n` then the choice. This works on a
model of any size; asking for a letter, as large models are asked, gives chance on small ones.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tinyllm.data.chat import encode_conversation
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.preference import final_reply_only
from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.errors import DataError
from tinyllm.eval.chat_eval import scored_rows

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str


def _subject(path: Path) -> str:
    stem = path.stem
    for suffix in ("_dev", "_val", "_test"):
        stem = stem.removesuffix(suffix)
    return stem


def _is_dev(path: Path) -> bool:
    return path.stem.endswith("_dev") or path.parent.name == "dev"


def _answer_index(answer, n_choices: int) -> int | None:
    """A letter ("B") or an index (1) → the index; None when it names none of the choices."""
    index = None
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    return index if index is not None and 0 <= index < n_choices else None


def _bad_answer(answer, n_choices: int) -> str:
    return f"answer {answer!r} is not one of the {n_choices} choices (a letter or an index)"


def _read_csv(path: Path) -> list[Question]:
    try:
        return _parse_csv(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.object[err.start]:#04x}); re-save the file as "
                        "UTF-8 (a GBK-encoded C-Eval/CMMLU copy needs converting)") from None


def _parse_csv(path: Path) -> list[Question]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None:
            return []
        header = [h.strip().lower() for h in first]
        letters = [c for c in LETTERS if c.lower() in header]
        if "question" not in header or len(letters) < 2:
            raise DataError(f"{path}:1: header {first} needs question, A, B, ... and answer columns (C-Eval/CMMLU)")
        if "answer" not in header:
            log.warning("%s: no answer column (a test split?); skipped", path)
            return []
        col = {name: header.index(name) for name in ("question", "answer", *(c.lower() for c in letters))}
        questions = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
            choices = tuple(row[col[c.lower()]] for c in letters)
            answer = _answer_index(row[col["answer"]], len(choices))
            if answer is None:
                raise DataError(f"{where}: {_bad_answer(row[col['answer']], len(choices))}")
            if blank := _blank_choice(choices):
                raise DataError(f"{where}: {blank}")
            questions.append(Question(row[col["question"]], choices, answer, _subject(path)))
    return questions


def _jsonl_problem(obj) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) \
            or not isinstance(obj.get("choices"), list):
        return "not a benchmark item {question, choices, answer}"
    if len(obj["choices"]) < 2:
        return "needs at least two choices"
    if _answer_index(obj.get("answer"), len(obj["choices"])) is None:
        return _bad_answer(obj.get("answer"), len(obj["choices"]))
    return _blank_choice([str(c) for c in obj["choices"]])


def _blank_choice(choices) -> str | None:
    """An empty choice has no token to score (its mean log-prob, 0, would beat every other) and a
    blank one nothing but a space: either is a broken line, refused in test and dev files alike."""
    blank = [LETTERS[i] if i < len(LETTERS) else str(i) for i, c in enumerate(choices) if not c.strip()]
    return f"choice {', '.join(blank)} is empty" if blank else None


def _read_jsonl(path: Path) -> list[Question]:
    return [Question(obj["question"], tuple(str(c) for c in obj["choices"]),
                     _answer_index(obj["answer"], len(obj["choices"])), str(obj.get("subject", _subject(path))))
            for obj in read_jsonl(path, _jsonl_problem)]


def read_benchmark(path: Path) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """(questions by subject, few-shot examples by subject) from a file or a folder of them."""
    if not path.exists():
        raise DataError(f"eval.benchmarks: {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".jsonl"))
    tests: dict[str, list[Question]] = {}
    dev: dict[str, list[Question]] = {}
    for file in files:
        for q in _read_csv(file) if file.suffix == ".csv" else _read_jsonl(file):
            (dev if _is_dev(file) else tests).setdefault(q.subject, []).append(q)
    if not tests:
        raise DataError(f"eval.benchmarks: {path} holds no questions (.csv in C-Eval's layout or .jsonl)")
    return tests, dev


def _example(tok: Tokenizer, q: Question, choice: str, chat: bool, shots: list[Question]) -> tuple:
    """(ids, mask): the few-shot examples and the question, then `choice`, the only tokens scored."""
    if chat:
        messages = [m for s in shots for m in ({"role": "user", "content": s.question},
                                                {"role": "assistant", "content": s.choices[s.answer]})]
        messages += [{"role": "user", "content": q.question}, {"role": "assistant", "content": choice}]
        ids, mask = encode_conversation(tok, messages)
        return ids, final_reply_only(mask)
    context = "".join(f"{s.question}\n{s.choices[s.answer]}\n\n" for s in shots) + f"{q.question}\n"
    prefix = [special_id(tok, ENDOFTEXT)] + tok.encode(context, add_special_tokens=False).ids
    answer = tok.encode(choice, add_special_tokens=False).ids
    return np.array(prefix + answer), np.array([False] * len(prefix) + [True] * len(answer))


def choice_scores(model, tok: Tokenizer, questions: list[Question], chat: bool,
                  shots: dict[str, list[Question]] | None = None) -> list[list[float]]:
    """Per question, the mean log-probability per token of each choice (fp32, eval mode)."""
    rows = [_example(tok, q, choice, chat, (shots or {}).get(q.subject, [])) for q in questions for choice in q.choices]
    logps, counts = scored_rows(model, tok, rows)
    means = (logps / counts.clamp(min=1)).tolist()
    out, i = [], 0
    for q in questions:
        out.append(means[i:i + len(q.choices)])
        i += len(q.choices)
    return out


def run_benchmark(model, tok: Tokenizer, path: Path, chat: bool, shots: int, max_items: int, seed: int) -> dict:
    """Accuracy per subject and overall (micro-averaged), with the chance level of the same questions.

    At most `max_items` questions per subject (a seeded sample); `shots` few-shot examples from the
    subject's dev file when it has one.
    """
    tests, dev = read_benchmark(path)
    rng = random.Random(seed)
    by_subject, correct, chance, n = {}, 0, 0.0, 0
    for subject, questions in sorted(tests.items()):
        if len(questions) > max_items:
            questions = rng.sample(questions, max_items)
        few = {subject: dev.get(subject, [])[:shots]} if shots else None
        picks = [int(np.argmax(s)) for s in choice_scores(model, tok, questions, chat, few)]
        hits = sum(p == q.answer for p, q in zip(picks, questions))
        by_subject[subject] = hits / len(questions)
        correct, n = correct + hits, n + len(questions)
        chance += sum(1 / len(q.choices) for q in questions)
    return {"accuracy": correct / n, "chance": chance / n, "questions": n, "subjects": by_subject}
