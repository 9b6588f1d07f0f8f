"""Which checkpoints a server offers, under which names.

    load_served_models(["artifacts/dpo", "base=artifacts/sft"])   # names "dpo" and "base"
    load_served_models([])                                        # the pipeline's newest chat model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinyllm.config import RuntimeConfig
from tinyllm.data.tokenizer import reply_stop_ids
from tinyllm.errors import UserError
from tinyllm.infer.chat import load_chat_model
from tinyllm.infer.utf8 import Utf8Guard
from tinyllm.train.runtime import resolve_dtype


@dataclass
class ServedModel:
    name: str
    model: object
    tok: object
    stop_ids: set[int]
    description: str
    utf8: Utf8Guard | None = None
    """Keeps sampled replies valid UTF-8 (`load_served_models` builds it from the tokenizer)."""

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len


def load_served_models(specs: list[str], adapter: Path | None = None, device: str = "cpu",
                       dtype: str = "float32") -> list[ServedModel]:
    """Load each `path` or `name=path` (the name defaults to the folder's); none means the newest
    chat checkpoint of the pipeline. `adapter` (a peft folder) applies to a single model. `dtype`
    (float32, bfloat16, or auto: bf16 on a GPU) is the weights' dtype."""
    if adapter and len(specs) > 1:
        raise UserError("--adapter applies to one model; serve one checkpoint with it")
    served = []
    for spec in specs or [""]:
        name, _, path = spec.rpartition("=")
        model, tok, description = load_chat_model(Path(path) if path else None, adapter, device)
        model = model.to(resolve_dtype(RuntimeConfig(dtype=dtype), next(model.parameters()).device))
        checkpoint = Path(description.split(" + ")[0])  # what load_chat_model chose: "path[ + adapter ...]"
        served.append(ServedModel(name or checkpoint.name, model, tok, reply_stop_ids(tok), description,
                                  Utf8Guard.for_model(tok, model)))
    names = [m.name for m in served]
    if len(set(names)) != len(names):
        raise UserError(f"two served models share a name ({', '.join(names)}); name them: NAME=PATH")
    return served
