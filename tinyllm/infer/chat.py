"""Multi-turn chat over any checkpoint: the engine behind `tinyllm chat` (and later the API and web page).

    model, tok, name = load_chat_model()                 # the pipeline's newest chat model
    session = ChatSession(model, tok, temperature=0.7, top_p=0.9)
    for piece in session.send("李明住在哪里？"):            # text pieces as they are generated
        print(piece, end="", flush=True)
    session.send("那他养了什么宠物？")                       # the history carries the earlier turn

When a conversation outgrows the context window, the oldest turns are dropped (the system prompt
stays) and `session.dropped_turns` says how many.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, load_tokenizer, render_chat, special_id
from tinyllm.errors import UserError
from tinyllm.infer.generate import stream_tokens
from tinyllm.train.checkpoint import is_checkpoint, load_model

CHAT_STAGES = ("dpo", "lora", "sft")
"""Pipeline checkpoints that chat, newest first."""


def newest_chat_checkpoint(artifacts: Path = Path("artifacts")) -> Path:
    """The last chat stage the pipeline has produced (dpo, else lora, else sft)."""
    for stage in CHAT_STAGES:
        if is_checkpoint(artifacts / stage):
            return artifacts / stage
    raise FileNotFoundError(f"{artifacts}: no chat checkpoint ({', '.join(CHAT_STAGES)}); run `dvc repro` first "
                            "or name a checkpoint folder")


def load_chat_model(checkpoint: Path | None = None, adapter: Path | None = None,
                    device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer, str]:
    """(model, tokenizer, description) for a checkpoint, optionally with a peft adapter on top."""
    checkpoint = Path(checkpoint) if checkpoint else newest_chat_checkpoint()
    if not is_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint folder (expected config.json and model.safetensors)")
    if adapter:
        from tinyllm.train.lora import load_with_adapter  # peft is imported only when an adapter is asked for

        model = load_with_adapter(checkpoint, Path(adapter), device)
        description = f"{checkpoint} + adapter {adapter}"
    else:
        model, description = load_model(checkpoint, device).eval(), str(checkpoint)
    return model, load_tokenizer(checkpoint), description


class ChatSession:
    """One conversation with one model: the history, the sampling settings, streamed replies."""

    def __init__(self, model, tok: Tokenizer, system_prompt: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float | None = 0.9, top_k: int | None = None,
                 seed: int | None = None):
        self.model, self.tok = model, tok
        self.system_prompt = system_prompt
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed = seed
        self.stop_ids = {special_id(tok, IM_END), special_id(tok, ENDOFTEXT)}
        self.context_len = model.config.max_seq_len
        self.messages: list[dict] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        """Forget the conversation (the settings stay)."""
        self.messages, self.dropped_turns = [], 0

    def _prompt_ids(self) -> list[int]:
        """The rendered history, oldest turns dropped until it leaves room to answer."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        room = self.context_len - min(self.max_new_tokens, self.context_len // 2)
        while True:
            text = render_chat(system + self.messages, add_generation_prompt=True)
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(ids) <= room:
                return ids
            if len(self.messages) <= 1:
                self.messages.pop()
                raise UserError(f"the message is {len(ids)} tokens; this model's context is {self.context_len} "
                                "tokens (shorten the message or the system prompt)")
            del self.messages[:2]  # the oldest user turn and its reply
            self.dropped_turns += 1

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the reply as text pieces; the reply joins the history at the end."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt_ids()
        ids: list[int] = []
        shown = ""
        for token in stream_tokens(self.model, prompt, self.max_new_tokens, stop_ids=self.stop_ids,
                                   temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed):
            ids.append(token)
            text_so_far = self.tok.decode(ids)
            if not text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text_so_far[len(shown):]
                shown = text_so_far
        reply = self.tok.decode(ids)
        if len(reply) > len(shown):
            yield reply[len(shown):]
        self.messages.append({"role": "assistant", "content": reply})
