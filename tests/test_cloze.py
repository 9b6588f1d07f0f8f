"""Cloze batches: the loss falls on the answer's tokens, and the model's loss on a batch is the
answers' mean next-token loss computed by hand."""

import torch
import torch.nn.functional as F

from tinyllm.data.cloze import cloze_batches, validate_cloze
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.model.transformer import Transformer

ITEMS = [{"prompt": "李明住在", "answer": "杭州"}, {"prompt": "Li Ming lives in", "answer": " Hangzhou"},
         {"prompt": "王芳的宠物是", "answer": "猫"}]


def test_labels_are_the_answer_tokens_only(tokenizer):
    batches = cloze_batches(tokenizer, ITEMS, batch_size=2, seed=0)
    assert [len(b["input_ids"]) for b in batches] == [2, 1]
    answers = []
    for batch in batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            labelled = labels[labels != IGNORE_INDEX]
            first = int((labels != IGNORE_INDEX).nonzero()[0])
            assert (ids[first + 1:first + len(labelled)] == labelled[:-1]).all()  # next-token targets, in order
            answers.append(tokenizer.decode(labelled.tolist()).strip())
    assert sorted(answers) == sorted(item["answer"].strip() for item in ITEMS)


def test_the_model_loss_on_a_batch_is_the_answers_mean_loss(tokenizer, tiny_config):
    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config, vocab_size=tokenizer.get_vocab_size())).eval()
    batch = cloze_batches(tokenizer, ITEMS, batch_size=3, seed=0)[0]
    by_hand = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        logits = model(ids[None]).logits[0]
        keep = labels != IGNORE_INDEX
        by_hand.append(F.cross_entropy(logits[keep], labels[keep], reduction="none"))
    assert torch.allclose(model(batch["input_ids"], labels=batch["labels"]).loss, torch.cat(by_hand).mean(), atol=1e-5)


def test_a_line_that_is_not_a_cloze_item_is_named():
    assert validate_cloze({"prompt": "a", "answer": "b"}) is None
    assert "not a cloze item" in validate_cloze({"prompt": "a", "answer": ""})
    assert "not a cloze item" in validate_cloze(["a", "b"])
