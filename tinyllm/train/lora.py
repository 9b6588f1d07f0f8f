"""The lora stage's library entry: low-rank adapters (peft) on the SFT model, teaching identity.

The base weights stay frozen; peft wraps the chosen Linear layers with y = Wx + (α/r)·B·A·x and
only A and B train, through the same `fit` loop as every stage. The stage saves both forms:

    artifacts/lora/adapter/   adapter_config.json + adapter_model.safetensors (standard peft;
                              load with `load_with_adapter(base_dir, adapter_dir)`)
    artifacts/lora/           the merged model, an ordinary checkpoint (W + (α/r)·B·A)

Identity chats alone would teach the model to answer everything with its own name, and chats
alone wear away facts it only read, so each batch also replays SFT's mix of chats and
pretraining text (`lora.replay_fraction`).

Adapters on the Linear layers cannot teach a token the base model never trained on: its
embedding row (also the output row, tied) was only ever pushed down. With a tokenizer that made
" Xiaoguang" one token, the English identity answers came out without the name ("I, an AI am
assistant by the TinyLLM team."). So the identity set's tokens that occur nowhere in the
pretraining text or the SFT chats get trainable embedding rows too (peft's trainable tokens,
saved in the adapter; `lora.train_new_tokens`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from tinyllm.config import LoRAConfig, Params, to_dict
from tinyllm.data.chat import ChatBatches, mixed_batches
from tinyllm.data.chat_tokens import content_files, load_chats
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.errors import ConfigError, DataError
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import load_for_finetuning, load_model, save_checkpoint
from tinyllm.train.distributed import TrainingRun, check_divisible, rank_share
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss

ADAPTER_DIR = "adapter"
COUNT_CHUNK = 1 << 24
"""Pretraining tokens counted at a time (the shards are memory-mapped; this bounds the copy)."""

log = logging.getLogger(__name__)


def lora_targets(model: Transformer, spec: str | list[str]) -> list[str]:
    """Module names to adapt. "all-linear" is every Linear layer except lm_head (tied to the
    embedding by default: adapting it would change the input embedding too) and an MoE's router
    `gate` (its scores pick experts; routed experts are stacked tensors, not Linear layers)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("mlp.gate")})
    if spec == "all-linear":
        return linear
    unknown = sorted(set(spec) - set(linear))
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown} are not Linear layers of the model "
                          f"(choose from {linear}, or 'all-linear')")
    return list(spec)


def new_tokens(taught: list[np.ndarray], trained: list[np.ndarray], token_dir: Path, vocab_size: int) -> list[int]:
    """Token ids in `taught` that occur nowhere in `trained` or in the pretraining text (token_dir's
    train split): the rows the base model's training never pulled towards any use."""
    seen = np.zeros(vocab_size, dtype=bool)
    for shard in TokenStream(token_dir, "train").shards:
        for start in range(0, len(shard), COUNT_CHUNK):
            seen |= np.bincount(shard[start:start + COUNT_CHUNK], minlength=vocab_size).astype(bool)
    for ids in trained:
        seen[ids] = True
    return [int(i) for i in np.unique(np.concatenate(taught)) if not seen[i]]


def add_lora(model: Transformer, cfg: LoRAConfig, base_dir: Path | None = None,
             token_rows: list[int] = ()) -> PeftModel:
    """Wrap `model` with fresh adapters (B = 0, so it computes exactly what it did before), and
    trainable embedding rows for the ids in `token_rows` (tied lm_head rows follow them)."""
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=lora_targets(model, cfg.target_modules),
                            trainable_token_indices={"embed_tokens": list(token_rows)} if token_rows else None)
    peft_model = get_peft_model(model, config)
    if base_dir is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)  # where the base lives
    return peft_model


def _sort_target_modules(config_file: Path) -> None:
    """peft writes target_modules from a set, in an order that changes with Python's string
    hashing from run to run; sorted, a retrain of the same weights writes the same folder (and
    DVC reruns nothing after it)."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_with_adapter(base_dir: Path, adapter_dir: Path, device: str | torch.device = "cpu") -> PeftModel:
    """A checkpoint with a saved peft adapter on top (weights read with safetensors)."""
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder (expected adapter_config.json)")
    return PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).to(device).eval()


def run_lora(params: Params, init_dir: Path, identity: Path, replay: list[Path], token_dir: Path,
             out_dir: Path, run: TrainingRun | None = None) -> dict:
    """Train adapters on the identity chats; save the adapter and the merged model.

    A `lora.replay_fraction` share of each batch replays SFT's own mix: the chats in
    `replay` and, in the `sft.pretrain_mix` proportion, pretraining text from `token_dir`.
    """
    cfg = params.lora
    run = run or TrainingRun()
    dist = run.dist
    check_divisible("lora", cfg.batch_size, dist)
    base, tok, seq_len, pad_id = load_for_finetuning(init_dir, params.seed, cfg.seq_len)
    taught = load_chats([identity], tok, params.sft.system_prompt)
    if not taught:
        raise DataError(f"{identity}: no conversations to teach (with data.source: files, list them in "
                        "data.identity, or set lora.enabled: false)")
    replay_rows = round(cfg.batch_size * cfg.replay_fraction)
    text_rows = round(replay_rows * params.sft.pretrain_mix)
    chat_rows = replay_rows - text_rows
    sources = [ChatBatches(taught, cfg.batch_size - replay_rows, seq_len, params.seed, pad_id)]
    replayed = load_chats(replay, tok, params.sft.system_prompt) if chat_rows or cfg.train_new_tokens else []
    if chat_rows:
        if not replayed:
            raise DataError(f"{', '.join(map(str, replay))}: no conversations to replay "
                            "(set lora.replay_fraction: 0 to train on identity alone)")
        sources.append(ChatBatches(replayed, chat_rows, seq_len, params.seed + 1, pad_id))
    if text_rows:
        sources.append(PackedBatches(TokenStream(token_dir, "train"), text_rows, seq_len, params.seed + 2))
    token_rows = []
    if cfg.train_new_tokens:
        token_rows = new_tokens([ids for ids, _ in taught], [ids for ids, _ in replayed], token_dir,
                                tok.get_vocab_size())
        log.info("lora: %d tokens of the identity set are new to the model, trained as embedding rows: %s",
                 len(token_rows), " ".join(tok.id_to_token(i) for i in token_rows[:40]))
    base_params = base.num_params()
    model = add_lora(base, cfg, base_dir=init_dir, token_rows=token_rows)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    result = fit(model, NextTokenLoss(), rank_share(mixed_batches(*sources), dist), cfg, params.runtime,
                 run=run, flops_per_token=base.flops_per_token(seq_len),
                 inputs=[*content_files([identity, *replay]), token_dir / "index.json"],
                 fixed_shapes=True)  # ChatBatches and PackedBatches: rows of seq_len
    if not dist.is_main:
        return result.final
    model.cpu()
    adapter_tmp = out_dir.with_name(out_dir.name + ".adapter.tmp")
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    model.save_pretrained(str(adapter_tmp), save_embedding_layers=False)  # embeddings are not adapted
    _sort_target_modules(adapter_tmp / "adapter_config.json")
    summary = {
        **result.final,
        "identity_conversations": len(taught),
        "new_tokens": len(token_rows),
        "trainable_params": trainable,
        "trainable_fraction": trainable / base_params,
        "target_modules": sorted(model.peft_config["default"].target_modules),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    meta = {"stage": "lora", "steps": result.steps, "train": to_dict(cfg), "summary": summary}
    save_checkpoint(model.merge_and_unload(), out_dir, meta=meta, tokenizer_dir=init_dir,
                    subdirs={ADAPTER_DIR: adapter_tmp})
    return summary
