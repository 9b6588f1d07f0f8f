"""The pretrain stage's library entry: packed token batches + next-token loss through `fit`.

    run_pretrain(load_params(), Path("artifacts/tokens"), Path("artifacts/tokenizer"),
                 Path("artifacts/pretrain"), run)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from tinyllm.config import Params, to_dict
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import save_checkpoint
from tinyllm.train.distributed import TrainingRun, check_divisible
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss
from tinyllm.train.runtime import device_name, resolve_device

log = logging.getLogger(__name__)

def build_model(params: Params, vocab_size: int) -> Transformer:
    """A freshly initialised model, seeded so the same params give the same weights."""
    torch.manual_seed(params.seed)
    return Transformer(dataclasses.replace(params.model, vocab_size=vocab_size))


def run_pretrain(params: Params, token_dir: Path, tokenizer_dir: Path | None, out_dir: Path,
                 run: TrainingRun | None = None) -> dict:
    """Train from scratch on the token shards; save the final checkpoint to `out_dir` (rank 0), with
    the tokenizer's files from `tokenizer_dir` (None: without them).

    Under torchrun each of the N processes takes pretrain.batch_size / N rows of every batch, so
    the global batch, and the losses, are the same for any N.

    Returns:
        Summary metrics (final losses, tokens seen, parameter counts, throughput).
    """
    cfg = params.pretrain
    run = run or TrainingRun()
    dist = run.dist
    check_divisible("pretrain", cfg.batch_size, dist)
    seq_len = cfg.seq_len or params.model.max_seq_len
    train = TokenStream(token_dir, "train")
    val = TokenStream(token_dir, "val")
    model = build_model(params, train.index["vocab_size"])
    batches = PackedBatches(train, cfg.batch_size // dist.world_size, seq_len, params.seed,
                            rank=dist.rank, world_size=dist.world_size)
    val_seq = min(seq_len, len(val) - 1)

    def val_batches():
        return PackedBatches(val, 1, val_seq, params.seed)  # a seeded spread of windows, not the first ones

    log.info("model: %.2fM parameters (%.2fM non-embedding, %.2fM active per token), device %s",
             model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6, model.num_params(active=True) / 1e6,
             device_name(resolve_device(params.runtime, dist)))
    start = time.perf_counter()
    result = fit(model, NextTokenLoss(), batches, cfg, params.runtime, val_batches=val_batches,
                 run=run, flops_per_token=model.flops_per_token(seq_len), inputs=[token_dir / "index.json"],
                 fixed_shapes=True)  # PackedBatches: rows of seq_len, the ragged end dropped
    seconds = time.perf_counter() - start
    tokens = result.steps * cfg.grad_accum * cfg.batch_size * seq_len
    summary = {
        **result.final,
        "tokens_seen": tokens,
        "processes": dist.world_size,
        "epochs": tokens / len(train),
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "params_active": model.num_params(active=True),
        "train_seconds": round(seconds, 1),
    }
    meta = {"stage": "pretrain", "steps": result.steps, "train": to_dict(cfg), "summary": summary}
    if dist.is_main:
        save_checkpoint(model.cpu(), out_dir, meta=meta, tokenizer_dir=tokenizer_dir)
    return summary
