"""Checkpoints: `model.safetensors` + `config.json` in one folder, written atomically.

A folder is written under a temporary name and renamed into place, so a crash leaves either
the old checkpoint or the new one, never half of one. Weights load with safetensors: nothing is
unpickled.

    save_checkpoint(model, Path("artifacts/pretrain"), meta={"stage": "pretrain"})
    model = load_model(Path("artifacts/pretrain"))
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from tinyllm.config import ModelConfig, to_dict
from tinyllm.data.tokenizer import ENDOFTEXT, load_tokenizer, special_id
from tinyllm.folders import replaced_folder
from tinyllm.model.transformer import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


WALL_CLOCK = re.compile(r"seconds|per_sec|mfu")
"""Summary keys that time a run (seconds, rates, MFU): they differ on every rerun."""


def save_checkpoint(model: Transformer, out_dir: Path, meta: dict | None = None,
                    tokenizer_dir: Path | None = None, subdirs: dict[str, Path] | None = None) -> None:
    """Write weights, model config and `meta` (stage, step, metrics) to `out_dir` atomically.

    The tokenizer's files are copied in from `tokenizer_dir`, so the folder is all a user needs;
    `subdirs` ({name: folder}) are moved in under those names (e.g. a LoRA adapter).
    The summary in `meta` is kept without its wall-clock figures (they are in the stage's
    reports/metrics file): a rerun that trains the same weights then writes the same folder, and
    `dvc repro` has nothing to rerun after it.
    """
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as embed_tokens; safetensors refuses shared storage
    meta = dict(meta or {})
    if "summary" in meta:
        meta["summary"] = {k: v for k, v in meta["summary"].items() if not WALL_CLOCK.search(k)}
    config = {"model": to_dict(model.config), **meta}
    with replaced_folder(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        for name, folder in (subdirs or {}).items():
            shutil.move(str(folder), str(tmp / name))


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint (a disabled stage's folder holds only a note)."""
    return (Path(path) / CONFIG).exists() and (Path(path) / WEIGHTS).exists()


def read_config(ckpt_dir: Path) -> dict:
    file = Path(ckpt_dir) / CONFIG
    if not file.exists():
        raise FileNotFoundError(f"{file}: not a checkpoint folder (expected {CONFIG} and {WEIGHTS})")
    return json.loads(file.read_text())


def load_model(ckpt_dir: Path, device: str | torch.device = "cpu", draw_random_init: bool = False) -> Transformer:
    """Build the model a checkpoint describes and load its weights.

    The model is built on the meta device, shapes without storage, and the file's tensors take the
    weights' places: a load at 768×8 took 0.9-1.1 s on a 2-core CPU when it drew random weights
    first only to overwrite them, 0.07-0.09 s without; eval loads five checkpoints, export one.
    `draw_random_init` draws them all the same, for a caller whose later random numbers follow
    that draw (`load_for_finetuning`).
    """
    ckpt_dir = Path(ckpt_dir)
    cfg = ModelConfig(**read_config(ckpt_dir)["model"])
    with contextlib.nullcontext() if draw_random_init else torch.device("meta"):
        model = Transformer(cfg)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    state = {name: tensor.to(dtypes.get(name, tensor.dtype))
             for name, tensor in load_file(str(ckpt_dir / WEIGHTS), device="cpu").items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{ckpt_dir / WEIGHTS}: weights do not match config.json "
                         f"(missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)})")
    model.tie_head_and_build_rope_tables()
    return model.to(device)


def load_for_finetuning(ckpt_dir: Path, seed: int, seq_len: int = 0) -> tuple[Transformer, Tokenizer, int, int]:
    """What every fine-tuning stage starts with: (model, tokenizer, training seq_len, pad id).

    Seeds torch first, so adapters and dropout start the same way for the same params. The random
    weights a new model draws are drawn before the checkpoint's replace them, as they always were:
    LoRA's adapters start from the random state after that draw, and skipping it (1 s at 768×8)
    would change every LoRA result and the stages after it. `seq_len` 0 means the model's max_seq_len.
    """
    torch.manual_seed(seed)
    model = load_model(ckpt_dir, draw_random_init=True)
    tok = load_tokenizer(ckpt_dir)
    return model, tok, seq_len or model.config.max_seq_len, special_id(tok, ENDOFTEXT)
