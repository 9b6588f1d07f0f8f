"""Eval's fact completions: cut at the longest answer's length, judged as at the full budget."""

import torch

from tests.conftest import make_chat_checkpoint, vary_weights
from tinyllm.data.tokenizer import ENDOFTEXT, special_id
from tinyllm.eval.metrics import fact_accuracy
from tinyllm.infer.generate import generate_batch
from tinyllm.train.checkpoint import load_model

PROMPTS = ["李明住在", "王芳是一名", "Li Ming lives in", "3加5等于", "他养了一只", "His pet is", "王芳最喜欢的颜色是"]


def test_cut_completions_get_the_verdicts_of_full_ones(tmp_path, tokenizer):
    model = vary_weights(load_model(make_chat_checkpoint(tmp_path, tokenizer, seed=3), torch.device("cpu")))
    eot = special_id(tokenizer, ENDOFTEXT)
    prompts = [[eot] + tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    full = [tokenizer.decode(ids) for ids in generate_batch(model, prompts, 40, stop_ids={eot}, pad_id=eot)]
    assert all(len(text) >= 4 for text in full)
    # Answers: the start of the model's own completion (right), or of the next prompt's (wrong,
    # unless the two happen to start alike); lengths vary so that the longest one sets the cut.
    items = [{"prompt": p, "answer": full[(i + i % 2) % len(full)][:2 + i % 3], "attribute": "city", "split": "sft"}
             for i, p in enumerate(PROMPTS)]
    metrics, rows = fact_accuracy(model, tokenizer, items, 40, 100, seed=0)

    expected = [text.startswith(item["answer"]) for text, item in zip(full, items)]
    assert [row["correct"] for row in rows] == expected
    assert True in expected and False in expected
    assert metrics["overall"] == sum(expected) / len(expected)
    longest = max(len(item["answer"].encode()) for item in items)
    assert longest < 40
    assert sum(map(len, (row["output"] for row in rows))) < sum(map(len, full))  # cut short of the budget
