import pytest
from transformers import AutoTokenizer

from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, IM_START, render_chat, save_tokenizer, special_id


@pytest.mark.parametrize("text", ["李明住在杭州。", "Hello, world!", "猫 🐱 emoji 🚀✨", "混合 mixed 文本 123"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for token in (ENDOFTEXT, IM_START, IM_END):
        ids = tokenizer.encode(f"你好{token}").ids
        assert ids[-1] == special_id(tokenizer, token)
    assert tokenizer.decode(tokenizer.encode(f"a{IM_END}b").ids, skip_special_tokens=False) == f"a{IM_END}b"


def test_the_vocabulary_is_filled_to_its_size_with_reserved_tokens_that_decode_to_nothing(tokenizer, tmp_path):
    """BPE found fewer merges than asked for in the sample texts; the rest are reserved, special
    tokens: the size is the param's (the model's shape follows from params), a reply holding one
    decodes without it, and transformers reads them as special too."""
    from tinyllm.data.tokenizer import RESERVED

    assert tokenizer.get_vocab_size() == 400
    last = tokenizer.id_to_token(399)
    assert last.startswith("<|reserved_") and tokenizer.token_to_id(RESERVED.format(0)) < 399
    ids = tokenizer.encode("你好").ids
    assert tokenizer.decode([*ids, 399]) == "你好"
    save_tokenizer(tokenizer, tmp_path)
    assert len(AutoTokenizer.from_pretrained(str(tmp_path))) == 400
    assert AutoTokenizer.from_pretrained(str(tmp_path)).decode([*ids, 399], skip_special_tokens=True) == "你好"


def test_han_characters_are_never_merged_together(tokenizer):
    for piece in tokenizer.encode("李明住在杭州").tokens:
        assert len(tokenizer.decode([tokenizer.token_to_id(piece)])) <= 1


def test_short_numbers_are_spelled_digit_by_digit_and_years_are_not():
    from tinyllm.config import TokenizerConfig
    from tinyllm.data.tokenizer import train_tokenizer

    texts = ["12加7等于19。3 plus 15 equals 18. 1998年出生，住在101号。"] * 50
    split = train_tokenizer(texts, TokenizerConfig(vocab_size=300, split_digits=2))
    assert [t for t in split.encode("12加7等于19。").tokens if t.isdigit()] == list("12719")
    assert [t for t in split.encode("1998年").tokens if t.isdigit()] != list("1998")  # a year keeps its merges
    assert [t for t in split.encode("住在101号").tokens if t.isdigit()] != list("101")  # 3 digits: merged
    for text in ("3 plus 15 equals 18.", "9", "x12y345z6", "2025-11-30 07:05"):
        assert split.decode(split.encode(text).ids) == text
    every = train_tokenizer(texts, TokenizerConfig(vocab_size=300, split_digits=8))
    assert [t for t in every.encode("1998年").tokens if t.isdigit()] == list("1998")
    whole = train_tokenizer(texts, TokenizerConfig(vocab_size=300))  # the default
    assert "19" in whole.encode("12加7等于19。").tokens  # BPE merges the digits of a frequent number


def test_transformers_loads_tokenizer_and_chat_template(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "李明住在哪里？"},
                {"role": "assistant", "content": "杭州"}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == render_chat(messages)
    assert text.startswith(f"{IM_START}system\n你是助手{IM_END}\n")
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{IM_START}assistant\n")
    assert hf.eos_token == IM_END
    assert hf.encode("李明", add_special_tokens=False) == tokenizer.encode("李明").ids
