"""Multi-turn chat over any checkpoint: the engine behind `tinyllm chat` and the web page.

    model, tok, name = load_chat_model()                 # the pipeline's newest chat model
    session = ChatSession(model, tok, temperature=0.7, top_p=0.9)
    for piece in session.send("李明住在哪里？"):            # text pieces as they are generated
        print(piece, end="", flush=True)
    session.send("那他养了什么宠物？")                       # the history carries the earlier turn

When a conversation outgrows the context window, the oldest turns are dropped (the system prompt
stays) and `session.dropped_turns` says how many.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer

from tinyllm.data.tokenizer import load_tokenizer, render_chat, reply_stop_ids
from tinyllm.errors import UserError
from tinyllm.infer.generate import stream_tokens
from tinyllm.infer.text import TextStream
from tinyllm.infer.utf8 import Utf8Guard
from tinyllm.train.checkpoint import is_checkpoint, load_model

CHAT_STAGES = ("grpo", "dpo", "lora", "sft")
"""Pipeline checkpoints that chat, newest first."""


def newest_chat_checkpoint(artifacts: Path = Path("artifacts")) -> Path:
    """The last chat stage the pipeline has produced (grpo, else dpo, else lora, else sft)."""
    for stage in CHAT_STAGES:
        if is_checkpoint(artifacts / stage):
            return artifacts / stage
    raise FileNotFoundError(f"{artifacts}: no chat checkpoint ({', '.join(CHAT_STAGES)}); run `dvc repro` first "
                            "or name a checkpoint folder")


def chat_checkpoint(checkpoint: Path | None = None, adapter: Path | None = None) -> Path:
    """The checkpoint a chat runs on: the one named, else the base an adapter was trained on (its
    adapter_config.json says), else the pipeline's newest. An adapter on any other base is
    refused, since on the merged lora or dpo model it would be applied twice."""
    if adapter:
        trained_on = _adapter_base(Path(adapter))
        checkpoint = Path(checkpoint) if checkpoint else trained_on
        if trained_on and checkpoint.resolve() != trained_on.resolve():
            raise UserError(f"{adapter} was trained on {trained_on}, not {checkpoint}; "
                            f"use `tinyllm chat {trained_on} --adapter {adapter}` "
                            f"(or the merged {Path(adapter).parent})")
    checkpoint = Path(checkpoint) if checkpoint else newest_chat_checkpoint()
    if not is_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint folder (expected config.json and model.safetensors)")
    return checkpoint


def load_chat_model(checkpoint: Path | None = None, adapter: Path | None = None,
                    device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer, str]:
    """(model, tokenizer, description) for `chat_checkpoint(checkpoint, adapter)`, with the peft
    adapter on top if one is given."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU (use cpu)")
    checkpoint = chat_checkpoint(checkpoint, adapter)
    try:
        if adapter:
            from tinyllm.train.lora import load_with_adapter  # peft is imported only when an adapter is asked for

            model = load_with_adapter(checkpoint, Path(adapter), device)
            description = f"{checkpoint} + adapter {adapter}"
        else:
            model, description = load_model(checkpoint, device).eval(), str(checkpoint)
    except (ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:  # damaged or mismatched files
        raise UserError(f"{adapter or checkpoint}: cannot load ({type(err).__name__}: {err})") from None
    return model, load_tokenizer(checkpoint), description


def _adapter_base(adapter: Path) -> Path | None:
    config = adapter / "adapter_config.json"
    if not config.exists():
        raise FileNotFoundError(f"{adapter}: not a peft adapter folder (expected adapter_config.json)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    return Path(base) if base else None


class ChatSession:
    """One conversation with one model: the history, the sampling settings, streamed replies."""

    def __init__(self, model, tok: Tokenizer, system_prompt: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float | None = 0.9, top_k: int | None = None,
                 seed: int | None = None, repetition_penalty: float = 1.0):
        self.model, self.tok = model, tok
        self.system_prompt = system_prompt
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed, self.repetition_penalty = seed, repetition_penalty
        self.stop_ids = reply_stop_ids(tok)
        self.utf8 = Utf8Guard.for_model(tok, model)
        self.context_len = model.config.max_seq_len
        self.messages: list[dict] = []
        self.dropped_turns = 0
        self.turns = 0

    def reset(self) -> None:
        """Forget the conversation (the settings stay)."""
        self.messages, self.dropped_turns = [], 0

    def _encode(self, messages: list[dict]) -> list[int]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return self.tok.encode(render_chat(system + messages, add_generation_prompt=True), add_special_tokens=False).ids

    def _prompt_ids(self, text: str) -> list[int]:
        """The history plus the new user turn, oldest turns dropped until it leaves room to answer."""
        room = self.context_len - min(self.max_new_tokens, self.context_len // 2)
        alone = self._encode([{"role": "user", "content": text}])
        if len(alone) > room:  # checked first, so a message that can never fit costs no history
            raise UserError(f"the message is {len(alone)} tokens with the chat format; this model's context is "
                            f"{self.context_len} tokens and {self.context_len - room} are kept for the reply "
                            "(shorten the message or the system prompt)")
        while len(ids := self._encode(self.messages + [{"role": "user", "content": text}])) > room:
            del self.messages[:2]  # the oldest user turn and its reply
            self.dropped_turns += 1
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to a new user turn as text pieces. The turn and the reply join the history
        when the reply ends, also when it is cut short (the caller stops iterating, or Ctrl-C)."""
        prompt = self._prompt_ids(text)
        self.turns += 1
        seed = None if self.seed is None else self.seed + self.turns  # repeatable, yet new noise each turn
        stream = TextStream(self.tok)
        try:
            for token in stream_tokens(self.model, prompt, self.max_new_tokens, stop_ids=self.stop_ids,
                                       temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
                                       repetition_penalty=self.repetition_penalty, utf8=self.utf8):
                if piece := stream.push(token):
                    yield piece
            if piece := stream.finish():
                yield piece
        finally:
            reply = self.tok.decode(stream.ids)
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
