"""The chat engine: history, streaming, sampling settings, context overflow."""

import pytest
import torch

from tinyllm.config import ModelConfig
from tinyllm.errors import UserError
from tinyllm.infer.chat import ChatSession
from tinyllm.infer.generate import generate
from tinyllm.model.transformer import Transformer


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=96,
                      vocab_size=tokenizer.get_vocab_size())
    return Transformer(cfg).eval()


def test_streamed_pieces_join_into_the_reply_and_the_history_grows(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=12, temperature=0)
    pieces = list(session.send("李明住在哪里？"))
    assert "".join(pieces) == session.messages[-1]["content"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    list(session.send("他养了什么宠物？"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    session.reset()
    assert session.messages == []


def test_a_tiny_top_p_keeps_only_the_most_likely_token(model):
    prompt = [5, 9, 2, 7]
    greedy = generate(model, prompt, 10)
    assert generate(model, prompt, 10, temperature=1.0, top_p=1e-6, seed=3) == greedy
    sampled = {tuple(generate(model, prompt, 10, temperature=1.5, top_p=1.0, seed=s)) for s in range(4)}
    assert len(sampled) > 1  # full-distribution sampling does vary with the seed


def test_the_oldest_turns_are_dropped_when_the_context_is_full(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=8, temperature=0)
    for i in range(8):
        list(session.send(f"第{i}个问题：王芳最喜欢的颜色是蓝色。"))
    assert session.dropped_turns > 0
    users = [m["content"] for m in session.messages[::2]]
    assert users[-1].startswith("第7个") and not any(u.startswith("第0个") for u in users)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * (len(session.messages) // 2)
    assert len(session._encode(session.messages[:-1])) <= 96 - 8  # what the last reply was generated from


def test_a_message_longer_than_the_context_is_refused_and_the_history_kept(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=8, temperature=0)
    list(session.send("你好"))
    with pytest.raises(UserError, match="context is 96 tokens"):
        list(session.send("李明住在杭州。" * 40))
    assert [m["content"] for m in session.messages[::2]] == ["你好"] and session.dropped_turns == 0


def test_a_reply_cut_short_still_joins_the_history(model, tokenizer):
    session = ChatSession(model, tokenizer, max_new_tokens=20, temperature=1.0, top_p=1.0, seed=0)
    stream = session.send("李明住在哪里？")
    first = next(stream)
    stream.close()  # the caller stops reading (a disconnect, Ctrl-C)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"].startswith(first)
