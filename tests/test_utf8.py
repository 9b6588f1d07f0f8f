"""Utf8Guard: sampled replies never break a multi-byte character."""

import itertools
import random

import pytest
import torch

from tinyllm.config import ModelConfig
from tinyllm.infer.generate import generate, generate_batch
from tinyllm.infer.utf8 import Utf8Guard, _byte_level_alphabet, next_state
from tinyllm.model.transformer import Transformer


def _valid_prefix(data: bytes) -> bool:
    """Whether some ending makes `data` valid UTF-8 (Python's own incremental decoder lets some
    impossible prefixes such as b"\\xed\\xa7", a surrogate, wait for more bytes)."""
    endings = [b""] + [bytes(c) for n in (1, 2, 3) for c in itertools.product((0x80, 0x90, 0xA0, 0xBF), repeat=n)]
    for ending in endings:
        try:
            (data + ending).decode("utf-8")
            return True
        except UnicodeDecodeError:
            pass
    return False


@pytest.mark.parametrize("data, state", [
    (b"abc", 0), ("李明".encode(), 0), ("é".encode(), 0), ("😀".encode(), 0),
    ("李".encode()[:1], 2), ("李".encode()[:2], 1), ("😀".encode()[:1], 5),
    (b"\x80", None), (b"\xc0\xaf", None), (b"\xe0\x80\x80", None),  # stray continuation, overlong forms
    (b"\xed\xa0\x80", None), (b"\xf4\x90\x80\x80", None), (b"\xf5", None),  # surrogate, past U+10FFFF
])
def test_next_state_follows_the_utf8_grammar(data, state):
    assert next_state(0, data) == state


def test_next_state_agrees_with_pythons_decoder_on_random_bytes():
    rng = random.Random(0)
    pieces = [bytes([b]) for b in range(256)] + [c.encode() for c in "aé李😀"]
    for _ in range(5000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        after = next_state(0, data)
        assert (after is not None) == _valid_prefix(data), data
        if after == 0:
            data.decode("utf-8")  # complete


def test_token_bytes_match_the_tokenizers_own_decoding(tokenizer):
    alphabet = _byte_level_alphabet()
    assert len(set(alphabet.values())) == 256
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    checked = 0
    for piece, token in tokenizer.get_vocab().items():
        data = bytes(alphabet[c] for c in piece) if piece not in special else None
        if data is not None and next_state(0, data) == 0:
            assert data.decode() == tokenizer.decode([token]), piece
            checked += 1
    assert checked > 100


def _random_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=96,
                      vocab_size=tokenizer.get_vocab_size())
    return Transformer(cfg).eval()


def _raw_bytes(tokenizer, ids):
    alphabet = _byte_level_alphabet()
    return b"".join(bytes(alphabet[c] for c in tokenizer.id_to_token(i)) for i in ids)


def test_sampling_with_the_guard_never_breaks_a_character(tokenizer):
    """An untrained model samples byte tokens freely: unguarded, some replies are broken UTF-8
    (so the check below can fail); guarded, every reply and every prefix of it is valid."""
    model = _random_model(tokenizer)
    guard = Utf8Guard.from_tokenizer(tokenizer)
    prompt = tokenizer.encode("李明住在").ids
    broken = sum(not _valid_prefix(_raw_bytes(tokenizer, generate(model, prompt, 40, temperature=1.5, seed=s)))
                 for s in range(20))
    assert broken > 0
    for s in range(20):
        ids = generate(model, prompt, 40, temperature=1.5, seed=s, utf8=guard)
        assert _valid_prefix(_raw_bytes(tokenizer, ids))
    rows = generate_batch(model, [prompt, tokenizer.encode("Li").ids], 40, temperature=1.5, seed=3, utf8=guard)
    assert all(_valid_prefix(_raw_bytes(tokenizer, ids)) for ids in rows)


def test_the_guard_never_allows_a_reserved_token_and_allows_chatml_between_characters(tokenizer):
    """The tokenizer's reserved tokens (filling it to its size) were never trained: an untrained
    model samples them (so the check can fail), a guarded one never does."""
    from tinyllm.data.tokenizer import IM_END, RESERVED, special_id

    reserved = {i for i in range(tokenizer.get_vocab_size()) if tokenizer.id_to_token(i).startswith(RESERVED[:11])}
    guard = Utf8Guard.from_tokenizer(tokenizer)
    assert reserved and not guard.table[:, sorted(reserved)].ge(0).any()
    end = special_id(tokenizer, IM_END)
    assert guard.table[0, end] == 0 and guard.table[1:, end].lt(0).all()
    model = _random_model(tokenizer)
    prompt = tokenizer.encode("李明住在").ids
    assert any(reserved & set(generate(model, prompt, 40, temperature=1.5, seed=s)) for s in range(5))
    assert not any(reserved & set(generate(model, prompt, 40, temperature=1.5, seed=s, utf8=guard)) for s in range(5))


def test_greedy_decoding_is_unchanged_where_it_was_already_valid(tokenizer):
    model = _random_model(tokenizer, seed=1)
    guard = Utf8Guard.from_tokenizer(tokenizer)
    prompt = tokenizer.encode("Li Ming lives in").ids
    plain = generate(model, prompt, 30)
    valid = next(n for n in range(len(plain), -1, -1) if _valid_prefix(_raw_bytes(tokenizer, plain[:n])))
    assert generate(model, prompt, 30, utf8=guard)[:valid] == plain[:valid]
