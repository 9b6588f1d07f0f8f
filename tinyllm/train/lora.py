"""The lora stage's library entry: low-rank adapters (peft) on the SFT model, teaching identity.

The base weights stay frozen; peft wraps the chosen Linear layers with y = Wx + (α/r)·B·A·x and
only A and B train, through the same `fit` loop as every stage. The stage saves both forms:

    artifacts/lora/adapter/   adapter_config.json + adapter_model.safetensors (standard peft;
                              load with `load_with_adapter(base_dir, adapter_dir)`)
    artifacts/lora/           the merged model, an ordinary checkpoint (W + (α/r)·B·A)

Identity chats alone would teach the model to answer everything with its own name, and chats
alone wear away facts it only read, so each batch also replays SFT's mix of chats and
pretraining text (`lora.replay_fraction`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from tinyllm.config import LoRAConfig, Params, to_dict
from tinyllm.data.chat import ChatBatches, encode_conversation, mixed_batches, read_conversations
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.errors import ConfigError, DataError
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import load_for_finetuning, load_model, save_checkpoint
from tinyllm.train.distributed import TrainingRun, check_divisible, rank_share
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss

ADAPTER_DIR = "adapter"


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


def add_lora(model: Transformer, cfg: LoRAConfig, base_dir: Path | None = None) -> PeftModel:
    """Wrap `model` with fresh adapters (B = 0, so it computes exactly what it did before)."""
    config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                            target_modules=lora_targets(model, cfg.target_modules))
    peft_model = get_peft_model(model, config)
    if base_dir is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)  # where the base lives
    return peft_model


def load_with_adapter(base_dir: Path, adapter_dir: Path, device: str | torch.device = "cpu") -> PeftModel:
    """A checkpoint with a saved peft adapter on top (weights read with safetensors)."""
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder (expected adapter_config.json)")
    return PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).to(device).eval()


def run_lora(params: Params, init_dir: Path, identity_file: Path, replay_files: list[Path], token_dir: Path,
             out_dir: Path, run: TrainingRun | None = None) -> dict:
    """Train adapters on the identity chats; save the adapter and the merged model.

    A `lora.replay_fraction` share of each batch replays SFT's own mix: the chats in
    `replay_files` and, in the `sft.pretrain_mix` proportion, pretraining text from `token_dir`.
    """
    cfg = params.lora
    run = run or TrainingRun()
    dist = run.dist
    check_divisible("lora", cfg.batch_size, dist)
    base, tok, seq_len, pad_id = load_for_finetuning(init_dir, params.seed, cfg.seq_len)
    identity = read_conversations([identity_file])
    if not identity:
        raise DataError(f"{identity_file}: no conversations to teach (with data.source: files, list them in "
                        "data.identity, or set lora.enabled: false)")
    replay_rows = round(cfg.batch_size * cfg.replay_fraction)
    text_rows = round(replay_rows * params.sft.pretrain_mix)
    chat_rows = replay_rows - text_rows
    sources = [ChatBatches([encode_conversation(tok, c, params.sft.system_prompt) for c in identity],
                           cfg.batch_size - replay_rows, seq_len, params.seed, pad_id)]
    if chat_rows:
        replay = [encode_conversation(tok, c, params.sft.system_prompt) for c in read_conversations(replay_files)]
        if not replay:
            raise DataError(f"{', '.join(map(str, replay_files))}: no conversations to replay "
                            "(set lora.replay_fraction: 0 to train on identity alone)")
        sources.append(ChatBatches(replay, chat_rows, seq_len, params.seed + 1, pad_id))
    if text_rows:
        sources.append(PackedBatches(TokenStream(token_dir, "train"), text_rows, seq_len, params.seed + 2))
    base_params = base.num_params()
    model = add_lora(base, cfg, base_dir=init_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    result = fit(model, NextTokenLoss(), rank_share(mixed_batches(*sources), dist), cfg, params.runtime,
                 run=run, flops_per_token=base.flops_per_token(seq_len),
                 inputs=[identity_file, *replay_files, token_dir / "index.json"])
    if not dist.is_main:
        return result.final
    model.cpu()
    adapter_tmp = out_dir.with_name(out_dir.name + ".adapter.tmp")
    shutil.rmtree(adapter_tmp, ignore_errors=True)
    model.save_pretrained(str(adapter_tmp), save_embedding_layers=False)  # embeddings are not adapted
    summary = {
        **result.final,
        "identity_conversations": len(identity),
        "trainable_params": trainable,
        "trainable_fraction": trainable / base_params,
        "target_modules": sorted(model.peft_config["default"].target_modules),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    meta = {"stage": "lora", "steps": cfg.max_steps, "train": to_dict(cfg), "summary": summary}
    save_checkpoint(model.merge_and_unload(), out_dir, meta=meta, tokenizer_dir=init_dir,
                    subdirs={ADAPTER_DIR: adapter_tmp})
    return summary
