"""Keep sampled text valid UTF-8: at each step, only tokens whose bytes can follow what came before.

A byte-level BPE vocabulary splits rare characters into byte tokens. Sampling can then pick a byte
that cannot continue the half-finished character before it (a Han character is 3 bytes), and the
reply shows "\ufffd". Greedy decoding almost never does this; sampling at temperature 0.7 with a
small vocabulary does (the demo model's web chat showed it).

`Utf8Guard` walks UTF-8's byte grammar (RFC 3629) over every token once, at load time, and
builds a table: for each decoder state (how many continuation bytes are still due, and their
allowed range) and each token, the state after the token, or -1 if the token would break the
text. Generation keeps one state per row on the device, masks the logits with `allowed(state)`
and advances with `advance(state, tokens)`: two gathers per step, no host sync.

    guard = Utf8Guard.for_model(tok, model)
    state = guard.start(batch_size)
    logits = logits.masked_fill(~guard.allowed(state), float("-inf"))
    state = guard.advance(state, tokens)

Special tokens (<|im_end|>, ...) are allowed only between characters, so a reply never ends on
half a character.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from tinyllm.data.tokenizer import SPECIAL_TOKENS

# States: (lowest, highest) byte allowed next, and the state after it. State 0 expects a new character.
_CONTINUATION = {
    1: ((0x80, 0xBF), 0),  # the last continuation byte
    2: ((0x80, 0xBF), 1),  # two to go
    3: ((0xA0, 0xBF), 1),  # after E0: no overlong 3-byte forms
    4: ((0x80, 0x9F), 1),  # after ED: no UTF-16 surrogates
    5: ((0x90, 0xBF), 2),  # after F0: no overlong 4-byte forms
    6: ((0x80, 0xBF), 2),  # after F1..F3
    7: ((0x80, 0x8F), 2),  # after F4: nothing above U+10FFFF
}
N_STATES = 8


def _after_lead(byte: int) -> int | None:
    """The state after a first byte, or None if no character starts with it."""
    if byte <= 0x7F:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    return {0xE0: 3, 0xED: 4, 0xF0: 5, 0xF4: 7}.get(byte) or (
        2 if 0xE1 <= byte <= 0xEF else 6 if 0xF1 <= byte <= 0xF3 else None)


def next_state(state: int, data: bytes) -> int | None:
    """The decoder state after `data`, starting in `state`; None if the bytes break UTF-8."""
    for byte in data:
        if state == 0:
            state = _after_lead(byte)
            if state is None:
                return None
        else:
            (low, high), after = _CONTINUATION[state]
            if not low <= byte <= high:
                return None
            state = after
    return state


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level pre-tokenizer's printable stand-in character for each byte, inverted: the
    printable bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) take the
    code points from 256 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_bytes(tok: Tokenizer) -> dict[int, bytes]:
    """The bytes each token id stands for (a special token: its text in UTF-8)."""
    alphabet = _byte_level_alphabet()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    return {token: piece.encode() if piece in special else bytes(alphabet[c] for c in piece)
            for piece, token in tok.get_vocab().items()}


class Utf8Guard:
    def __init__(self, table: torch.Tensor):
        self.table = table
        """(N_STATES, vocab) long: the state after each token, -1 where it would break the text."""

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, device: torch.device | str = "cpu", vocab_size: int | None = None
                       ) -> Utf8Guard:
        """The table for a byte-level BPE tokenizer. Ids past the tokenizer (a model's padded
        vocabulary) and its reserved tokens (never trained) are never allowed; ChatML's special
        tokens only between characters."""
        size = vocab_size or tok.get_vocab_size()
        table = torch.full((N_STATES, size), -1, dtype=torch.long)
        special = {t.content for t in tok.get_added_tokens_decoder().values()}
        for token, data in token_bytes(tok).items():
            if token >= size:
                continue
            piece = tok.id_to_token(token)
            if piece in special:
                if piece in SPECIAL_TOKENS:  # (a reserved one never)
                    table[0, token] = 0
                continue
            for state in range(N_STATES):
                after = next_state(state, data)
                if after is not None:
                    table[state, token] = after
        return cls(table.to(device))

    @classmethod
    def for_model(cls, tok: Tokenizer, model) -> Utf8Guard:
        """The table on the model's device, over the model's vocabulary."""
        return cls.from_tokenizer(tok, next(model.parameters()).device, model.config.vocab_size)

    def start(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, dtype=torch.long, device=self.table.device)

    def allowed(self, state: torch.Tensor) -> torch.Tensor:
        """(B, vocab) bool: the tokens each row may take next."""
        return self.table[state] >= 0

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[state, tokens]
