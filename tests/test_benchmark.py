"""Multiple-choice benchmarks: the layouts read, and the scorer against a by-hand computation."""

import json
import random

import pytest
import torch

from tests.conftest import make_chat_checkpoint
from tinyllm.config import WorldConfig
from tinyllm.data.chat_data import bench_world
from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.data.world import build_world
from tinyllm.errors import DataError
from tinyllm.eval.benchmark import choice_scores, read_benchmark, run_benchmark
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import load_model

THREE = [{"question": "李明住在哪里？", "choices": ["杭州", "北京", "上海"], "answer": 0},
         {"question": "3加5等于多少？", "choices": ["8", "9", "10", "7"], "answer": "A"},
         {"question": "Li Ming's pet?", "choices": ["a cat", "a dog"], "answer": 1}]


@pytest.fixture
def model(tmp_path, tokenizer) -> Transformer:
    return load_model(make_chat_checkpoint(tmp_path, tokenizer, max_seq_len=64, seed=3), torch.device("cpu"))


def test_c_eval_cmmlu_and_jsonl_layouts(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "dev").mkdir()
    law = "id,question,A,B,C,D,answer\n0,问题一,甲,乙,丙,丁,C\n1,问题二,甲,乙,丙,丁,a\n"
    (tmp_path / "val/law_val.csv").write_text(law, encoding="utf-8")
    (tmp_path / "dev/law_dev.csv").write_text("id,question,A,B,C,D,answer,explanation\n0,例题,甲,乙,丙,丁,B,因为\n",
                                              encoding="utf-8")
    (tmp_path / "val/art.csv").write_text(",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,D\n", encoding="utf-8")  # CMMLU
    (tmp_path / "val/mixed.jsonl").write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in THREE) + "\n")
    tests, dev = read_benchmark(tmp_path)
    assert sorted(tests) == ["art", "law", "mixed"]
    assert [q.answer for q in tests["law"]] == [2, 0] and tests["art"][0].answer == 3
    assert [q.answer for q in tests["mixed"]] == [0, 0, 1] and len(tests["mixed"][0].choices) == 3
    assert [q.question for q in dev["law"]] == ["例题"]


@pytest.mark.parametrize("content, message", [
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n", "x.csv:2: answer 'E' is not one of the 4 choices"),
    ("id,question,A,B,C,D,answer\n0,q,a,b\n", "x.csv:2: 4 fields, the header has 7"),
    ("id,prompt,A,B\n", "x.csv:1: header"),
    ("id,question,A,B,C,D,answer\n0,q,a, ,c,d,A\n", "x.csv:2: choice B is empty"),  # it would always win
])
def test_bad_benchmark_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "x.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_benchmark(tmp_path / "x.csv")


def test_a_gbk_encoded_csv_is_named_and_not_a_decode_traceback(tmp_path):
    (tmp_path / "x.csv").write_bytes("id,question,A,B,C,D,answer\n0,问题,甲,乙,丙,丁,A\n".encode("gbk"))
    with pytest.raises(DataError, match=r"x.csv: not valid UTF-8 .* re-save the file as UTF-8"):
        read_benchmark(tmp_path / "x.csv")


def _by_hand(model, tok, prefix_ids: list[int], choice_ids: list[int]) -> float:
    """Mean log p(choice token | everything before it), straight from the logits."""
    ids = torch.tensor([prefix_ids + choice_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float()[0], dim=-1)
    return sum(float(logp[len(prefix_ids) - 1 + i, t]) for i, t in enumerate(choice_ids)) / len(choice_ids)


def test_scores_match_a_by_hand_computation(tmp_path, model, tokenizer):
    tok = tokenizer
    (tmp_path / "three.jsonl").write_text("\n".join(json.dumps(q, ensure_ascii=False) for q in THREE) + "\n")
    questions = read_benchmark(tmp_path / "three.jsonl")[0]["three"]
    eot = special_id(tok, ENDOFTEXT)

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    base = choice_scores(model, tok, questions, chat=False)
    chat = choice_scores(model, tok, questions, chat=True)
    for q, base_row, chat_row in zip(questions, base, chat):
        for choice, got_base, got_chat in zip(q.choices, base_row, chat_row):
            assert got_base == pytest.approx(_by_hand(model, tok, [eot] + enc(q.question + "\n"), enc(choice)),
                                             abs=1e-4)
            prompt = enc("<|im_start|>user\n") + enc(q.question + "<|im_end|>") + enc("\n") \
                + enc("<|im_start|>assistant\n")
            assert got_chat == pytest.approx(_by_hand(model, tok, prompt, enc(choice + "<|im_end|>")), abs=1e-4)
    picks = [max(range(len(row)), key=row.__getitem__) for row in chat]
    result = run_benchmark(model, tok, tmp_path / "three.jsonl", chat=True, shots=0, max_items=100, seed=0)
    assert result["accuracy"] == pytest.approx(sum(p == q.answer for p, q in zip(picks, questions)) / 3)
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3) and result["questions"] == 3


def test_few_shot_examples_go_before_the_question(tmp_path, model, tokenizer):
    (tmp_path / "dev").mkdir()
    (tmp_path / "s.jsonl").write_text(json.dumps(THREE[0], ensure_ascii=False) + "\n")
    (tmp_path / "dev/s_dev.jsonl").write_text(json.dumps(THREE[1], ensure_ascii=False) + "\n")
    tests, dev = read_benchmark(tmp_path)
    zero = choice_scores(model, tokenizer, tests["s"], chat=False)
    one = choice_scores(model, tokenizer, tests["s"], chat=False, shots={"s": dev["s"][:1]})
    assert zero != one
    eot = special_id(tokenizer, ENDOFTEXT)
    prefix = [eot] + tokenizer.encode("3加5等于多少？\n8\n\n李明住在哪里？\n", add_special_tokens=False).ids
    assert one[0][0] == pytest.approx(_by_hand(model, tokenizer, prefix,
                                               tokenizer.encode("杭州", add_special_tokens=False).ids), abs=1e-4)


def test_the_world_benchmark_has_one_true_choice_of_four():
    world = build_world(WorldConfig(n_people=40), 7, "data/world/lexicon.json")
    items = bench_world(world, random.Random(0))
    assert {i["subject"] for i in items} == {"seen", "heldout"}
    people = {p.name.zh: p for p in world.people}
    for item in items:
        assert len(set(item["choices"])) == 4
        right = item["choices"][item["answer"]]
        name = next(n for n in people if right.startswith(n))
        assert all(c.startswith(name) for c in item["choices"])  # the same sentence, other values
