import numpy as np
import torch

from tinyllm.data.chat import ChatBatches, encode_conversation, encode_conversations, validate_conversation
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, render_chat

CONV = [{"role": "user", "content": "李明住在哪里？"}, {"role": "assistant", "content": "李明住在杭州。"},
        {"role": "user", "content": "他养了什么宠物？"}, {"role": "assistant", "content": "他养了猫。"}]


def test_encoding_equals_the_chat_template_rendering(tokenizer):
    ids, _ = encode_conversation(tokenizer, CONV)
    assert ids.tolist() == tokenizer.encode(render_chat(CONV), add_special_tokens=False).ids


def test_encoding_many_at_once_equals_the_template_and_masks_every_reply(tokenizer):
    system = {"role": "system", "content": "你是助手"}
    conversations = [CONV, CONV[:2], [system, *CONV],
                     [{"role": "user", "content": "Hi\n\nthere"}, {"role": "assistant", "content": "Hello!\n"}],
                     [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
                     [{"role": "user", "content": f"say {IM_END} and <|im_start|>user"},
                      {"role": "assistant", "content": "<|endoftext|>好"}]]
    assert encode_conversations(tokenizer, []) == []
    for prompt in (None, "你是小光"):
        together = encode_conversations(tokenizer, conversations, system_prompt=prompt)
        for (ids, mask), conv in zip(together, conversations, strict=True):
            with_prompt = prompt and conv[0]["role"] != "system"
            rendered = [{"role": "system", "content": prompt}, *conv] if with_prompt else conv
            assert ids.tolist() == tokenizer.encode(render_chat(rendered), add_special_tokens=False).ids
            replies = "".join(m["content"] + IM_END for m in conv if m["role"] == "assistant")
            assert tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False) == replies


def test_loss_mask_covers_exactly_every_assistant_reply_and_its_im_end(tokenizer):
    ids, mask = encode_conversation(tokenizer, CONV, system_prompt="你是助手")
    learned = tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert learned == f"李明住在杭州。{IM_END}他养了猫。{IM_END}"
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n你是助手")


def test_validation_names_the_problem():
    assert validate_conversation({"conversations": CONV}) is None
    assert "empty" in validate_conversation({"conversations": []})
    assert "last message" in validate_conversation({"conversations": CONV[:1]})
    assert "message 0" in validate_conversation({"conversations": [{"role": "bot", "content": "x"}]})


def test_packed_rows_keep_whole_conversations_and_shift_labels(tokenizer):
    examples = [encode_conversation(tokenizer, CONV[:2]), encode_conversation(tokenizer, CONV)]
    pad = tokenizer.token_to_id(ENDOFTEXT)
    batch = next(iter(ChatBatches(examples, batch_size=4, seq_len=127, seed=0, pad_id=pad)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 127)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        target = labels != IGNORE_INDEX
        # a labelled position predicts the next input token
        assert torch.equal(labels[:-1][target[:-1]], ids[1:][target[:-1]])
    rows = ChatBatches(examples, batch_size=4, seq_len=127, seed=0, pad_id=pad)._rows()
    for _ in range(4):
        ids, _mask, _padding = next(rows)
        real = ids[: len(ids) - int(np.argmax(ids[::-1] != pad))]  # strip the padding tail
        text = tokenizer.decode(real.tolist(), skip_special_tokens=False)
        conversations = text.split("<|im_start|>user\n李明住在哪里？")[1:]  # both start so
        assert conversations and all(c.endswith(f"{IM_END}\n") for c in conversations)  # only whole ones


def test_truncation_is_counted(tokenizer):
    long = [{"role": "user", "content": "问"}, {"role": "assistant", "content": "杭州" * 40}]
    ids, mask = encode_conversation(tokenizer, long)
    batches = ChatBatches([(ids, mask)], batch_size=1, seq_len=31, seed=0, pad_id=0)
    assert batches.truncated_labels == int(mask[32:].sum()) > 0
    assert next(iter(batches))["input_ids"].shape == (1, 31)


def test_padding_carries_no_loss(tokenizer):
    ids, mask = encode_conversation(tokenizer, CONV[:2])
    batch = next(iter(ChatBatches([(ids, mask)], batch_size=1, seq_len=len(ids) + 10, seed=0, pad_id=0)))
    assert (batch["labels"][0, len(ids) - 1:] == IGNORE_INDEX).all()
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == int(mask[1:].sum()) == int(np.sum(mask))


def test_an_epoch_packs_every_conversation_once_into_nearly_full_rows(tokenizer):
    """First-fit-decreasing within windows of the shuffle: conversations of very different lengths
    leave little padding (laid in the shuffled order, these left 12%)."""
    rng = np.random.default_rng(0)
    examples = [encode_conversation(tokenizer, [{"role": "user", "content": "介绍一下李明。"},
                                                {"role": "assistant", "content": "李明住在杭州。" * int(n)}])
                for n in rng.integers(1, 6, size=600)]
    batches = ChatBatches(examples, batch_size=4, seq_len=255, seed=0, pad_id=tokenizer.token_to_id(ENDOFTEXT))
    rows, epoch = [], batches._rows()
    while True:
        row = next(epoch)
        if batches.epoch:
            break
        rows.append(row)
    labelled = sum(int(mask.sum()) for _ids, mask, _padding in rows)
    assert labelled == sum(int(mask.sum()) for _ids, mask in examples)  # each one once, whole
    padding = sum(int(pad.sum()) for _ids, _mask, pad in rows) / sum(len(ids) for ids, _mask, _pad in rows)
    assert padding < 0.05, padding


def test_the_packed_stream_depends_on_the_seed_alone(tokenizer):
    """What exact resume rests on: a new ChatBatches with the same seed yields the same batches, so
    skipping the ones an interrupted run used lands where it stopped; another seed differs."""
    examples = [encode_conversation(tokenizer, [{"role": "user", "content": "介绍一下李明。"},
                                                {"role": "assistant", "content": "李明住在杭州。" * n}])
                for n in range(1, 40)]

    def stream(seed):
        return iter(ChatBatches(examples, batch_size=4, seq_len=127, seed=seed, pad_id=0))

    first, again = stream(0), stream(0)
    for _ in range(30):  # several epochs
        a, b = next(first), next(again)
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = stream(0)
    for _ in range(30):
        next(resumed)
    assert torch.equal(next(resumed)["input_ids"], next(first)["input_ids"])
    assert not torch.equal(next(stream(1))["input_ids"], next(stream(0))["input_ids"])
