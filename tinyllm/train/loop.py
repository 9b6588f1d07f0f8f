"""The training loop. Pretrain, SFT, LoRA and DPO all run through `fit`; they differ only in
the batches they pass and the objective, never in loop code.

The loop owns: the learning-rate schedule (warmup + cosine), gradient accumulation, the
non-finite-loss check, periodic validation, metrics (loss, lr, grad norm, tokens/s, MFU), the
progress bar, and resumable checkpoints. How a step runs (device, bf16, compile, DDP or DeepSpeed
ZeRO) is the engine's business (`tinyllm/train/engine.py`). No host sync happens inside a step:
losses stay on the device and are read only at log intervals and checkpoints.

    result = fit(model, NextTokenLoss(), train_batches, cfg.pretrain, cfg.runtime,
                 val_batches=lambda: val_batches, run=run)
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tinyllm.config import RuntimeConfig, TrainConfig
from tinyllm.errors import NonFiniteLossError
from tinyllm.model.transformer import IGNORE_INDEX
from tinyllm.train import resume
from tinyllm.train.distributed import TrainingRun
from tinyllm.train.engine import make_engine
from tinyllm.train.logging import NullLogger
from tinyllm.train.runtime import autocast, peak_flops, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    """One dict per log interval: step, train/loss, lr, grad_norm, tokens_per_sec, mfu, val/loss,
    and the objective's extras as train/<name>."""
    final: dict = field(default_factory=dict)
    """The last interval's train/* metrics and the last val loss."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned, asynchronous host-to-GPU copies; a no-op move on CPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, objective, batches: Iterable[dict], device: torch.device, dtype: torch.dtype,
             max_batches: int | None = None) -> float:
    """Mean objective loss over up to `max_batches` batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, dtype):
            loss, _ = objective(model, to_device(batch, device))
        total += loss.float()
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation got no batches")
    return (total / count).item()


def fit(model: torch.nn.Module, objective: Callable, batches: Iterable[dict], cfg: TrainConfig,
        runtime: RuntimeConfig, *, run: TrainingRun | None = None,
        val_batches: Callable[[], Iterable[dict]] | None = None, flops_per_token: float | None = None,
        inputs: Iterable[Path] = ()) -> FitResult:
    """Train `model` in place for cfg.max_steps optimizer steps.

    Args:
        model: the (unwrapped) fp32 model; it is moved to the runtime device.
        objective: `objective(model, batch) -> (loss, extras)`; extras are scalar tensors
            (e.g. DPO's reward accuracy) averaged per interval and logged as "train/<name>".
        batches: an endless iterable of micro-batches (dicts of CPU tensors with "labels"), this
            process's share under torchrun. If it has `state()`/`load_state()` (PackedBatches) a
            resume restores its position; otherwise a resume skips the micro-batches already used.
        cfg: steps, batch, optimizer and interval settings.
        runtime: device, dtype, compile.
        run: processes, logger, strategy (DDP / DeepSpeed) and resumable checkpoints; the default
            is one process with none of them.
        val_batches: makes a fresh validation iterable; None skips validation.
        flops_per_token: training FLOPs per token for MFU; None skips MFU.
        inputs: files whose content defines the run's data; a resumable checkpoint written from
            other data is not resumed.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the message names the step and the
            last good resumable checkpoint, which is kept).
    """
    run = run or TrainingRun()
    dist, logger = run.dist, run.logger or NullLogger()
    device = resolve_device(runtime, dist)
    dtype = resolve_dtype(runtime, device)
    ckpt = run.checkpoint if run.checkpoint_dir is not None else None
    point, fingerprint = None, ""
    if ckpt is not None:
        geometry = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len}
        fingerprint = resume.run_fingerprint(model, geometry, inputs)
        if ckpt.resume == "auto":
            point = resume.load_newest(run.checkpoint_dir, fingerprint)
    start_step, micro_batches, result = 0, 0, FitResult()
    if point is not None:
        start_step, micro_batches = point.step, point.state["micro_batches"]
        result.history = point.state["history"]
        resume.restore_rng(point.rng, dist)
        if point.state["data"] is not None:
            batches.load_state(point.state["data"])
        if dist.is_main:
            log.info("resuming from %s (step %d of %d, written by %d process(es))", point.path, point.step,
                     cfg.max_steps, point.state["world_size"])
        for entry in result.history:  # the curve so far, so dvclive's plots are whole again
            logger.log(entry["step"], {k: v for k, v in entry.items() if k != "step"})
    engine = make_engine(model, cfg, runtime, dist, device, dtype, run.distributed,
                         start=(point.weights, point.optim) if point is not None else None)
    last_good = point.path if point is not None else None
    del point
    peak = peak_flops(device)
    it = iter(batches)
    if micro_batches and not hasattr(batches, "load_state"):
        it = itertools.islice(it, micro_batches, None)  # skip what the interrupted run already used

    window_loss = torch.zeros((), device=device)  # summed on the device, read at log time
    window_extras: dict[str, torch.Tensor] = {}  # the objective's own metrics, likewise
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    val_loss = None

    def check_finite() -> None:
        """Raise if any rank's loss went non-finite since the last check (one host sync); the
        resumable checkpoints written so far were all checked, so they are good."""
        if dist.enabled:
            torch.distributed.all_reduce(first_bad_step, torch.distributed.ReduceOp.MAX)
        if first_bad_step.item() >= 0:
            kept = f"the last good checkpoint, {last_good}, is kept: rerun to resume from it" if last_good \
                else "nothing was saved"
            raise NonFiniteLossError(f"loss became non-finite at step {first_bad_step.item() + 1}; "
                                     f"lower the learning rate or check the data; {kept}")

    def save_checkpoint(steps_done: int) -> None:
        """A resumable checkpoint, right after a log point (metrics windows are empty)."""
        weights, optim = engine.full_state()
        rng = resume.rng_states(dist)
        if dist.is_main:
            state = {"fingerprint": fingerprint, "micro_batches": micro_batches, "world_size": dist.world_size,
                     "data": batches.state() if hasattr(batches, "state") else None, "history": result.history}
            resume.save_resume_point(run.checkpoint_dir, steps_done, weights, optim, rng, state, ckpt.keep)

    # resumable checkpoints are written at the first log point at or after each multiple of the interval
    next_checkpoint = (start_step // ckpt.interval + 1) * ckpt.interval if ckpt and ckpt.interval else 0
    bar = tqdm(range(start_step, cfg.max_steps), desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main, initial=start_step, total=cfg.max_steps)
    for step in bar:
        lr = lr_at(step, cfg)
        engine.set_lr(lr)
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = next(it)
            micro_batches += 1
            window_tokens += int((batch["labels"] != IGNORE_INDEX).sum()) * dist.world_size
            loss, extras = engine.forward_backward(objective, to_device(batch, device), micro == cfg.grad_accum - 1)
            step_loss += loss.detach().float() / cfg.grad_accum
            for name, value in extras.items():
                window_extras[name] = window_extras.get(name, 0) + value.detach().float() / cfg.grad_accum
        grad_norm = engine.step()
        first_bad_step.masked_fill_(~torch.isfinite(step_loss) & (first_bad_step < 0), step)  # no host sync
        window_loss += step_loss
        window_steps += 1

        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.log_interval == 0 or last:
            if dist.enabled:  # the mean over ranks
                torch.distributed.all_reduce(window_loss)
                window_loss /= dist.world_size
                for value in window_extras.values():
                    torch.distributed.all_reduce(value)
                    value /= dist.world_size
            check_finite()
            train_loss = (window_loss / window_steps).item()  # the one host sync per interval
            elapsed = time.perf_counter() - window_start
            metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_sec": window_tokens / elapsed}
            if window_extras:
                values = (torch.stack(list(window_extras.values())) / window_steps).tolist()
                metrics.update({f"train/{name}": v for name, v in zip(window_extras, values)})
            if peak and flops_per_token:  # tokens/s of all processes against all their GPUs' peak
                metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / (peak * dist.world_size)
            if val_batches is not None and ((step + 1) % cfg.eval_interval == 0 or last):
                val_loss = evaluate(engine.eval_model, objective, val_batches(), device, dtype, cfg.eval_batches)
                metrics["val/loss"] = val_loss
            logger.log(step + 1, metrics)
            if dist.is_main:
                log.info("step %d/%d | loss %.4f | lr %.2e | %.1fk tok/s%s", step + 1, cfg.max_steps, train_loss, lr,
                         metrics["tokens_per_sec"] / 1e3, f" | val {val_loss:.4f}" if "val/loss" in metrics else "")
            result.history.append({"step": step + 1, **metrics})
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['tokens_per_sec'] / 1e3:.1f}k", refresh=False)
            window_loss.zero_()
            window_extras.clear()
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
            if ckpt is not None and ckpt.interval and step + 1 >= next_checkpoint and not last:
                save_checkpoint(step + 1)
                last_good = resume.step_dir(run.checkpoint_dir, step + 1)
                next_checkpoint = (step + 1) // ckpt.interval * ckpt.interval + ckpt.interval
    bar.close()
    engine.finish()
    result.final = {k: v for k, v in result.history[-1].items() if k.startswith("train/")}
    if val_loss is not None:
        result.final["val/loss"] = val_loss
    return result
