"""The training loop. Pretrain, SFT, LoRA and DPO all run through `fit`; they differ only in
the batches they pass and the objective, never in loop code.

The loop owns: device placement, bf16 autocast, optional torch.compile, AdamW with warmup +
cosine decay, gradient accumulation, clipping, the non-finite-loss check, periodic validation,
metrics (loss, lr, grad norm, tokens/s, MFU) and the progress bar. No host sync happens
inside a step: losses stay on the device and are read only at log intervals.

    result = fit(model, NextTokenLoss(), train_batches, cfg.pretrain, cfg.runtime,
                 val_batches=lambda: val_batches, logger=LiveLogger(Path("reports/live/pretrain")))
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tinyllm.config import RuntimeConfig, TrainConfig
from tinyllm.errors import NonFiniteLossError
from tinyllm.model.transformer import IGNORE_INDEX
from tinyllm.train.distributed import Dist
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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


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
        runtime: RuntimeConfig, *, val_batches: Callable[[], Iterable[dict]] | None = None,
        logger=None, flops_per_token: float | None = None, dist: Dist | None = None) -> FitResult:
    """Train `model` in place for cfg.max_steps optimizer steps.

    Args:
        model: the (unwrapped) model; it is moved to the runtime device.
        objective: `objective(model, batch) -> (loss, extras)`; extras are scalar tensors
            (e.g. DPO's reward accuracy) averaged per interval and logged as "train/<name>".
        batches: an endless iterable of micro-batches (dicts of CPU tensors with "labels").
        cfg: steps, batch, optimizer and interval settings.
        runtime: device, dtype, compile.
        val_batches: makes a fresh validation iterable; None skips validation.
        logger: receives metrics at each log interval (NullLogger when None).
        flops_per_token: training FLOPs per token for MFU; None skips MFU.
        dist: the process group (torchrun). With several processes the model is wrapped in DDP,
            gradients are all-reduced once per optimizer step (no_sync while accumulating), and
            logged losses and throughput are for all ranks together; `batches` must be this
            rank's share.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the message names the step).
    """
    logger = logger or NullLogger()
    dist = dist or Dist()
    device = resolve_device(runtime, dist)
    dtype = resolve_dtype(runtime, device)
    model.to(device).train()
    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.enabled else model
    step_model = torch.compile(wrapped) if runtime.compile else wrapped
    optimizer = build_optimizer(model, cfg, device)
    peak = peak_flops(device)
    result = FitResult()
    it = iter(batches)

    window_loss = torch.zeros((), device=device)  # summed on the device, read at log time
    window_extras: dict[str, torch.Tensor] = {}  # the objective's own metrics, likewise
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    val_loss = None
    bar = tqdm(range(cfg.max_steps), desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main)
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = next(it)
            window_tokens += int((batch["labels"] != IGNORE_INDEX).sum()) * dist.world_size
            last_micro = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or not dist.enabled else wrapped.no_sync()
            with sync, autocast(device, dtype):
                loss, extras = objective(step_model, to_device(batch, device))
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
            for name, value in extras.items():
                window_extras[name] = window_extras.get(name, 0) + value.detach().float() / cfg.grad_accum
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_bad_step.masked_fill_(~torch.isfinite(step_loss) & (first_bad_step < 0), step)  # no host sync
        window_loss += step_loss
        window_steps += 1

        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.log_interval and not last:
            continue
        if dist.enabled:  # the mean over ranks, and the first bad step any rank saw
            torch.distributed.all_reduce(window_loss)
            window_loss /= dist.world_size
            for value in window_extras.values():
                torch.distributed.all_reduce(value)
                value /= dist.world_size
            torch.distributed.all_reduce(first_bad_step, torch.distributed.ReduceOp.MAX)
        train_loss = (window_loss / window_steps).item()  # the one host sync per interval
        if first_bad_step.item() >= 0:
            raise NonFiniteLossError(f"loss became non-finite at step {first_bad_step.item() + 1}; "
                                     "lower the learning rate or check the data. Nothing was saved.")
        elapsed = time.perf_counter() - window_start
        metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_sec": window_tokens / elapsed}
        if window_extras:
            values = (torch.stack(list(window_extras.values())) / window_steps).tolist()
            metrics.update({f"train/{name}": v for name, v in zip(window_extras, values)})
        if peak and flops_per_token:
            metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / peak
        if val_batches is not None and ((step + 1) % cfg.eval_interval == 0 or last):
            val_loss = evaluate(model, objective, val_batches(), device, dtype, cfg.eval_batches)
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
    bar.close()
    result.final = {k: v for k, v in result.history[-1].items() if k.startswith("train/")}
    if val_loss is not None:
        result.final["val/loss"] = val_loss
    return result
