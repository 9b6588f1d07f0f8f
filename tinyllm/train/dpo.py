"""The dpo stage's library entry: preference pairs + `DPOLoss` through `fit`.

The reference model is the starting checkpoint, frozen. Its log-probs of every pair are computed
once, before training, and travel in the batches: no second model in memory, no second forward
pass per step.

    run_dpo(params, Path("artifacts/sft"), Path("artifacts/data/dpo.jsonl"), Path("artifacts/dpo"), run)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tinyllm.config import Params, to_dict
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.preference import (
    PreferenceBatches,
    encode_pairs,
    pack_pairs,
    pairs_drawn,
    truncated_labels,
    validate_preference,
)
from tinyllm.errors import DataError, TrainingError
from tinyllm.train.checkpoint import load_for_finetuning, save_checkpoint
from tinyllm.train.distributed import TrainingRun, check_divisible, rank_share
from tinyllm.train.engine import step_replays
from tinyllm.train.loop import fit
from tinyllm.train.objectives import DPOLoss, packed_sequence_logprobs
from tinyllm.train.runtime import autocast, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@torch.no_grad()
def pair_logprobs(model, pairs: list, seq_len: int, pad_id: int, device: torch.device, dtype: torch.dtype,
                  pairs_per_forward: int = 64) -> torch.Tensor:
    """(len(pairs), 2): summed log-probs of each pair's (chosen, rejected) final reply, in eval
    mode, packed as the training batches are."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(pairs), pairs_per_forward):
        chunk = pairs[start:start + pairs_per_forward]
        batch = {k: v.to(device) for k, v in pack_pairs(chunk, seq_len, pad_id).items()}
        with autocast(device, dtype):  # the same precision as the training forward, so π = π_ref at step 0
            logps, _ = packed_sequence_logprobs(model, batch, 2 * len(chunk))
        out.append(torch.stack(logps.float().chunk(2), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def run_dpo(params: Params, init_dir: Path, pairs_file: Path, out_dir: Path,
            run: TrainingRun | None = None) -> dict:
    """Train the checkpoint in `init_dir` on the preference pairs; save to `out_dir`.

    Raises:
        DataError: no pairs, or a pair that cannot teach anything (names the file and line).
        TrainingError: the reference log-probs are not finite, or training left the policy
            where it started (the margin never moved off 0: the loss would sit at 0.693).
    """
    cfg = params.dpo
    run = run or TrainingRun()
    dist = run.dist
    check_divisible("dpo", cfg.batch_size, dist)
    model, tok, seq_len, pad_id = load_for_finetuning(init_dir, params.seed, cfg.seq_len)
    records = list(read_jsonl(pairs_file, validate_preference))
    if len(records) < cfg.batch_size:
        raise DataError(f"{pairs_file}: {len(records)} preference pairs, fewer than dpo.batch_size={cfg.batch_size}"
                        + (" (with data.source: files, list preference files in data.dpo)" if not records else ""))
    pairs = encode_pairs(tok, records, params.sft.system_prompt)
    lost = truncated_labels(pairs, seq_len)
    if lost:
        log.warning("%d reply tokens fall beyond seq_len=%d and are not trained on", lost, seq_len)

    device = resolve_device(params.runtime, dist)
    dtype = resolve_dtype(params.runtime, device)
    start = time.perf_counter()
    drawn = pairs_drawn(len(pairs), cfg.batch_size, params.seed, cfg.max_steps * cfg.grad_accum)
    scored = pair_logprobs(model.to(device), [pairs[i] for i in drawn], seq_len, pad_id, device, dtype)
    if not torch.isfinite(scored).all():
        bad = int(drawn[(~torch.isfinite(scored)).any(1).nonzero()[0]])
        raise TrainingError(f"{pairs_file}: pair {bad + 1}: the reference model's log-prob is not finite")
    ref_logps = torch.full((len(pairs), 2), float("nan"))  # a pair never drawn is never scored
    ref_logps[drawn] = scored
    ref_seconds = time.perf_counter() - start

    stream = PreferenceBatches(pairs, ref_logps, cfg.batch_size, seq_len, params.seed, pad_id, shares=dist.world_size)
    # Where the step could replay as CUDA graphs, every batch is padded to the most rows any of the
    # run's batches packs into: one shape, a little padding, and none of the host's time per step
    # (DPO's steps are short: on an H100 the host set their pace; reports/gpu_speed.md).
    graphs = step_replays(model, cfg, params.runtime, dist, device, fixed_shapes=True,
                          strategy=run.distributed.strategy)
    if graphs:
        stream.rows = stream.most_rows(cfg.max_steps * cfg.grad_accum)
    result = fit(model, DPOLoss(cfg.beta, cfg.nll_coef), rank_share(stream, dist), cfg, params.runtime, run=run,
                 flops_per_token=model.flops_per_token(seq_len), inputs=[pairs_file], fixed_shapes=graphs)
    if abs(result.final["train/margin"]) < 1e-6:
        raise TrainingError("DPO did not move the policy off the reference (reward margin 0, loss 0.693): "
                            "raise dpo.lr or dpo.max_steps")
    summary = {
        **result.final,
        "pairs": len(pairs),
        "reference_pairs": len(drawn),
        "truncated_reply_tokens": lost,
        "reference_seconds": round(ref_seconds, 1),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    meta = {"stage": "dpo", "steps": result.steps, "train": to_dict(cfg), "summary": summary}
    if dist.is_main:
        save_checkpoint(model.cpu(), out_dir, meta=meta, tokenizer_dir=init_dir)
    return summary
