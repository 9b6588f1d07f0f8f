"""Which checkpoints a server offers, under which names.

    load_served_models(["artifacts/dpo", "base=artifacts/sft"])   # names "dpo" and "base"
    load_served_models([])                                        # the pipeline's newest chat model

A `ServedModel` holds what the API itself needs (tokenizer, context, stop tokens); the weights are
loaded by `load`, in the process that runs the model's batches (`serve/engine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from tinyllm.config import RuntimeConfig
from tinyllm.data.tokenizer import load_tokenizer, reply_stop_ids
from tinyllm.errors import UserError
from tinyllm.infer.chat import chat_checkpoint, load_chat_model
from tinyllm.infer.utf8 import Utf8Guard
from tinyllm.train.checkpoint import read_config
from tinyllm.train.runtime import resolve_dtype


@dataclass
class ServedModel:
    name: str
    checkpoint: Path
    tok: Tokenizer
    stop_ids: set[int]
    """Tokens that end a reply."""
    context: int
    adapter: Path | None = None

    @property
    def description(self) -> str:
        return str(self.checkpoint) + (f" + adapter {self.adapter}" if self.adapter else "")

    def load(self, device: str = "cpu", dtype: str = "auto"):
        """(model, Utf8Guard) on `device`; `dtype` is the weights' (float32, bfloat16, or auto: bf16
        on a GPU, float32 on a CPU: the batcher's greedy replies equal their solo ones there, which
        tests/test_batcher.py checks in float32). The guard keeps sampled replies valid UTF-8."""
        model, _, _ = load_chat_model(self.checkpoint, self.adapter, device)
        placed = next(model.parameters()).device
        if dtype == "auto" and placed.type == "cpu":
            dtype = "float32"  # training's auto would take bf16 on a CPU where it runs faster
        model = model.to(resolve_dtype(RuntimeConfig(dtype=dtype), placed))
        return model, Utf8Guard.for_model(self.tok, model)


def load_served_models(specs: list[str], adapter: Path | None = None) -> list[ServedModel]:
    """Each `path` or `name=path` (the name defaults to the folder's; a spec that is an existing
    folder is a path, and a name ends at its first `=`, so paths may hold `=`); none means the
    newest chat checkpoint of the pipeline. `adapter` (a peft folder) applies to a single model."""
    if adapter and len(specs) > 1:
        raise UserError("--adapter applies to one model; serve one checkpoint with it")
    served = []
    for spec in specs or [""]:
        name, _, path = ("", "", spec) if Path(spec).is_dir() or "=" not in spec else spec.partition("=")
        if "=" in spec and not path:
            raise UserError(f"{spec!r}: NAME=PATH needs a path after '='")
        checkpoint = chat_checkpoint(Path(path) if path else None, adapter)
        tok = load_tokenizer(checkpoint)
        try:
            context = int(read_config(checkpoint)["model"]["max_seq_len"])
        except (ValueError, KeyError, TypeError) as err:  # a damaged or foreign config.json
            raise UserError(f"{checkpoint}/config.json: no model.max_seq_len ({type(err).__name__}: {err})") from None
        served.append(ServedModel(name or checkpoint.name, checkpoint, tok, reply_stop_ids(tok), context, adapter))
    names = [m.name for m in served]
    if len(set(names)) != len(names):
        raise UserError(f"two served models share a name ({', '.join(names)}); name them: NAME=PATH")
    return served
