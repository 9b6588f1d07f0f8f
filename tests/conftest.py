"""Shared fixtures: a tiny tokenizer and a tiny model config, built in well under a second."""

import pytest

from tinyllm.config import ModelConfig, TokenizerConfig
from tinyllm.data.tokenizer import train_tokenizer

SAMPLE_TEXTS = [
    "李明住在杭州。他养了一只猫。",
    "王芳是一名医生，她最喜欢的颜色是蓝色。",
    "Li Ming lives in Hangzhou. His pet is a cat.",
    "3加5等于8。12减7等于5。",
] * 50


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(SAMPLE_TEXTS, TokenizerConfig(vocab_size=400))


@pytest.fixture
def tiny_config():
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64, vocab_size=97)
