"""Shared fixtures: a tiny tokenizer and a tiny model config, built in well under a second."""

from pathlib import Path

import pytest

from tinyllm.config import ModelConfig, TokenizerConfig
from tinyllm.data.tokenizer import train_tokenizer

SAMPLE_TEXTS = [
    "李明住在杭州。他养了一只猫。",
    "王芳是一名医生，她最喜欢的颜色是蓝色。",
    "Li Ming lives in Hangzhou. His pet is a cat.",
    "3加5等于8。12减7等于5。",
] * 50


@pytest.fixture(autouse=True)
def float32_on_the_cpu(monkeypatch):
    """runtime.dtype auto picks bf16 on a CPU where bf16 runs faster (tinyllm/train/runtime.py). Tests run
    in float32 unless they ask otherwise: their exact equalities and tolerances are float32's, and
    their results must not depend on which CPU runs them. (Stages run as subprocesses still measure.)"""
    from tinyllm.train import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: False)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(SAMPLE_TEXTS, TokenizerConfig(vocab_size=400))


@pytest.fixture
def tiny_config():
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64, vocab_size=97)


def make_chat_checkpoint(folder: Path, tokenizer, max_seq_len: int = 64, seed: int = 0, moe=None) -> Path:
    """A tiny random model (an MoE with `moe`, a MoEConfig) saved as a pipeline checkpoint (weights,
    config, tokenizer files)."""
    import torch

    from tinyllm.data.tokenizer import save_tokenizer
    from tinyllm.model.transformer import Transformer
    from tinyllm.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    save_tokenizer(tokenizer, folder / "tok")
    cfg = ModelConfig(dim=32, n_layers=1 if moe is None else 3, n_heads=2, n_kv_heads=1, hidden_dim=64,
                      max_seq_len=max_seq_len, vocab_size=tokenizer.get_vocab_size(), **({"moe": moe} if moe else {}))
    save_checkpoint(Transformer(cfg), folder / "ckpt", tokenizer_dir=folder / "tok")
    return folder / "ckpt"


def vary_weights(model, seed: int = 1):
    """Redraw every matrix at std 0.4, so greedy replies vary from prompt to prompt (the default init
    gives near-uniform logits and one repeated token)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.4)
    return model


def llama_cpp_flip(llama, model, ids: list[int], n: int) -> tuple[int, float] | None:
    """Greedy `n` tokens after `ids` in llama.cpp (`llama`, a llama_cpp.Llama) against our engine's:
    None if equal, else the first differing position and our two best logits' gap there."""
    import torch

    from tinyllm.infer.generate import generate

    expected = generate(model, ids, n)
    llama.reset()
    got = [t for _, t in zip(expected, llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0))]
    if got == expected:
        return None
    at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    with torch.no_grad():
        top2 = model(torch.tensor([ids + expected[:at]])).logits[0, -1].topk(2).values
    return at, float(top2[0] - top2[1])
