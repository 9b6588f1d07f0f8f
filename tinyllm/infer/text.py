"""Token ids in, safe text pieces out: incremental decoding with stop strings.

    stream = TextStream(tok, stop=["\\n\\n"])
    for token in tokens:
        piece = stream.push(token)        # "" while a character or a possible stop string is pending
        if stream.stopped:                # a stop string appeared: the text before it is all there is
            break
    rest = stream.finish()

A byte-level BPE token can end inside a multi-byte character, and text that might be the start of
a stop string must not be shown before we know it isn't; both are held back until resolved.

Each push decodes only the tokens since the last whole character (byte-level decoding of a
sequence is the concatenation of its parts' bytes), so a long reply costs the same per token as a
short one: the server pushes tokens of 32 replies at every step.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class TextStream:
    def __init__(self, tok: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []  # every token pushed
        self.decoded = ""  # the text of every token up to the last whole character
        self.partial: list[int] = []  # the tokens after it (they end inside a character)
        self.shown = ""  # text already handed out
        self.text = ""  # the final text once stopped or finished
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (maybe "")."""
        self.ids.append(token)
        self.partial.append(token)
        tail = self.tok.decode(self.partial)
        if tail.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return self._advance(self.text) if self._cut_at_stop(self.decoded + tail.rstrip("\ufffd")) else ""
        self.decoded += tail
        self.partial = []
        if self._cut_at_stop(self.decoded):
            return self._advance(self.text)
        return self._advance(self.decoded[:len(self.decoded) - self._pending_stop_prefix(self.decoded)])

    def finish(self) -> str:
        """The text not yet shown, once generation has ended."""
        if not self.stopped:
            decoded = self.decoded + self.tok.decode(self.partial)
            if not self._cut_at_stop(decoded):
                self.text = decoded
        return self._advance(self.text)

    def _cut_at_stop(self, decoded: str) -> bool:
        cut = min((i for i in (decoded.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, decoded[:cut]
        return cut >= 0

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)

    def _advance(self, visible: str) -> str:
        piece = visible[len(self.shown):] if visible.startswith(self.shown) else ""
        if piece:
            self.shown = visible
        return piece
