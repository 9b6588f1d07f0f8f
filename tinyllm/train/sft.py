"""The sft stage's library entry: chat batches (+ some pretraining text) through `fit`.

Single- and multi-turn conversations train together in one stage; every assistant turn
carries loss. A share of every batch (`sft.pretrain_mix`) is pretraining text, so facts the
model only read (people never asked about in SFT) are not forgotten.

    run_sft(params, Path("artifacts/pretrain"), [Path("artifacts/chat_tokens/sft_single")],
            Path("artifacts/tokens"), Path("artifacts/sft"), run,
            val_chats=[Path("artifacts/chat_tokens/heldout_single")])

Chats are encode_chats set folders (memory-mapped) or .jsonl files (encoded here). With held-out
conversations (`val_chats`), their reply loss is the validation loss: it is logged
at every sft.eval_interval, and with sft.keep: best the stage saves the weights where it was lowest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tinyllm.config import Params, to_dict
from tinyllm.data.chat import ChatBatches, mixed_batches
from tinyllm.data.chat_tokens import content_files, load_chats
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.errors import DataError
from tinyllm.train.checkpoint import load_for_finetuning, save_checkpoint
from tinyllm.train.distributed import TrainingRun, check_divisible, rank_share
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss

log = logging.getLogger(__name__)


def run_sft(params: Params, init_dir: Path, chats: list[Path], token_dir: Path, out_dir: Path,
            run: TrainingRun | None = None, val_chats: list[Path] = ()) -> dict:
    """Fine-tune the checkpoint in `init_dir` on the conversations; save to `out_dir`.

    Returns:
        Summary metrics, including how many labelled tokens truncation dropped.
    """
    cfg = params.sft
    run = run or TrainingRun()
    dist = run.dist
    check_divisible("sft", cfg.batch_size, dist)
    model, tok, seq_len, pad_id = load_for_finetuning(init_dir, params.seed, cfg.seq_len)
    examples = load_chats(chats, tok, cfg.system_prompt)
    if not examples:
        raise DataError(f"{', '.join(map(str, chats))}: no conversations to fine-tune on "
                        "(with data.source: files, list chat files in data.sft)")
    text_rows = round(cfg.batch_size * cfg.pretrain_mix)
    chat = ChatBatches(examples, cfg.batch_size - text_rows, seq_len, params.seed, pad_id=pad_id)
    sources = [chat]
    if text_rows:
        sources.append(PackedBatches(TokenStream(token_dir, "train"), text_rows, seq_len, params.seed + 1))
    if chat.truncated_labels:
        log.warning("%d assistant tokens fall beyond seq_len=%d and are not trained on", chat.truncated_labels, seq_len)
    held_out = load_chats(list(val_chats), tok, cfg.system_prompt)

    def val_batches():  # the same batches at every eval point
        return ChatBatches(held_out, cfg.batch_size, seq_len, params.seed, pad_id=pad_id)

    if held_out:
        val_batches()  # a held-out set with no reply that fits seq_len fails here, not at the first eval point

    start = time.perf_counter()
    result = fit(model, NextTokenLoss(), rank_share(mixed_batches(*sources), dist), cfg, params.runtime,
                 run=run, flops_per_token=model.flops_per_token(seq_len), val_batches=val_batches if held_out else None,
                 inputs=[*content_files([*chats, *val_chats]), token_dir / "index.json"],
                 fixed_shapes=True)  # ChatBatches and PackedBatches: rows of seq_len
    summary = {
        **result.final,
        "conversations": len(examples),
        "assistant_tokens": int(sum(m.sum() for _, m in examples)),
        "truncated_assistant_tokens": chat.truncated_labels,
        "chat_epochs_completed": chat.epoch,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    meta = {"stage": "sft", "steps": result.steps, "train": to_dict(cfg), "summary": summary}
    if dist.is_main:
        save_checkpoint(model.cpu(), out_dir, meta=meta, tokenizer_dir=init_dir)
    return summary
