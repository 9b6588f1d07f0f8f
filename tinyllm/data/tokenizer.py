"""Byte-level BPE tokenizer with ChatML special tokens, saved for `transformers` too.

    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=1024))
    save_tokenizer(tok, Path("artifacts/tokenizer"))
    AutoTokenizer.from_pretrained("artifacts/tokenizer")   # works, chat template included

Byte-level means any string round-trips (emoji, unseen scripts). With `split_han`, every Han
character is its own pre-token, so merges never cross Chinese characters: on a small templated
corpus, BPE otherwise fuses "name + 住在 + city" into single tokens and facts stop sharing tokens.

The vocabulary has exactly `vocab_size` tokens: where BPE finds fewer merges than asked for (the
default world: 1,902 of 2,048), reserved special tokens fill the rest, as Llama 3 reserves some.
So the model's shape follows from params alone, and pretraining's step can compile on a GPU before
the tokenizer exists (`tinyllm/pretrain_ahead.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tinyllm.config import TokenizerConfig

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
RESERVED = "<|reserved_{}|>"
"""The filling tokens' names. Special, like the ChatML ones: decoding drops them."""

# ChatML: every message is <|im_start|>role\ncontent<|im_end|>\n; generation continues after
# "<|im_start|>assistant\n" and a finished reply ends with <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def short_number_digits(max_digits: int) -> str:
    """A regex matching each digit of every number of at most `max_digits` digits ("19" → "1", "9";
    "1998" untouched at 2): one alternative per digit position, each looking back a fixed length."""
    alternatives = []
    for k in range(1, max_digits + 1):
        behind = f"(?<=^\\d{{{k - 1}}}|\\D\\d{{{k - 1}}})" if k > 1 else "(?<!\\d)"
        alternatives.append(f"{behind}\\d(?=\\d{{0,{max_digits - k}}}(?!\\d))")
    return "|".join(alternatives)


def _pre_tokenizer(split_han: bool, split_digits: int):
    """Han characters and the digits of short numbers isolated as asked, then GPT-2's byte-level split."""
    splits = [pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated")] if split_han else []
    if split_digits:
        splits.append(pre_tokenizers.Split(Regex(short_number_digits(split_digits)), behavior="isolated"))
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterable; it is streamed, not held in memory), filled to
    `cfg.vocab_size` tokens with reserved ones."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(cfg.split_han, cfg.split_digits)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([RESERVED.format(i) for i in range(cfg.vocab_size - tok.get_vocab_size())])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json plus the files `AutoTokenizer.from_pretrained` reads."""
    from transformers import PreTrainedTokenizerFast  # heavy import, only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out_dir))


def load_tokenizer(path: Path) -> Tokenizer:
    """Load the fast tokenizer (`path` is the folder or its tokenizer.json)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer here (run `dvc repro train_tokenizer`)")
    return Tokenizer.from_file(str(file))


def special_id(tok: Tokenizer, token: str) -> int:
    """Id of a special token; a tokenizer without it is not one of ours."""
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token} token; retrain it with `dvc repro train_tokenizer`")
    return token_id


def reply_stop_ids(tok: Tokenizer) -> set[int]:
    """Tokens that end an assistant reply: <|im_end|>, and <|endoftext|> from a model that lost the format."""
    return {special_id(tok, IM_END), special_id(tok, ENDOFTEXT)}


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML text that CHAT_TEMPLATE produces (kept in Python for the data pipeline)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
