"""The training loop. Pretrain, SFT, LoRA, DPO and GRPO all run through `fit`; they differ only in
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

import copy
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tinyllm import cpu_threads
from tinyllm.config import RuntimeConfig, TrainConfig
from tinyllm.errors import NonFiniteLossError
from tinyllm.train import resume
from tinyllm.train.distributed import TrainingRun
from tinyllm.train.engine import make_engine
from tinyllm.train.logging import NullLogger
from tinyllm.train.runtime import (
    autocast,
    compile_cache_counts,
    compile_seconds,
    compile_timers,
    compiled_graphs,
    peak_flops,
    process_seconds,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    """One dict per log interval: step, train/loss, lr, grad_norm, tokens_per_sec, padding_share,
    recompiles (since the first step), mfu, val/loss, and the objective's extras as train/<name>."""
    final: dict = field(default_factory=dict)
    """The last interval's train/* metrics, the last val loss, and the speed of the run:
    tokens_per_sec and padding_share after the first interval, recompiles after the first step
    (`MetricsWindow`), cuda_graphs (1: the steps replayed as CUDA graphs), startup_seconds (stage
    start to the end of the first step: imports, loading, compiling), setup_seconds (the part of it
    before `fit` was called: imports, data, loading the checkpoint), first_step_seconds (the first
    step, and on a resume the skipping of used batches), compile_seconds (the part of the first
    step Dynamo and Inductor took, where the step is compiled, with compile_cache_hits and
    compile_cache_misses: its graphs read from Inductor's cache on disk and compiled anew) and mfu."""

    @property
    def steps(self) -> int:
        """Optimizer steps the stage took, a resumed run's earlier ones included: fewer than
        max_steps where `patience` stopped it early."""
        return self.history[-1]["step"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Pinned, asynchronous host-to-GPU copies; a no-op move on CPU. The padding mask stays on the
    host: only the throughput count reads it."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items() if k != "padding"}


@torch.no_grad()
def evaluate(model, objective, batches: Iterable[dict], device: torch.device, dtype: torch.dtype,
             max_batches: int | None = None, dist=None) -> float:
    """Mean objective loss over up to `max_batches` batches, in eval mode (and over the processes
    under torchrun, so every rank sees the same number)."""
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
    mean = total / count
    if dist is not None and dist.enabled:
        torch.distributed.all_reduce(mean)
        mean /= dist.world_size
    return mean.item()


class MetricsWindow:
    """Losses, the objective's extras and token counts summed since the last log point.

    They stay on the device (no host sync per step); `close` reads them once per log interval,
    averaged over the processes, and raises if a loss went non-finite in between.

    Throughput counts every position that goes through the model, padding included, the same way
    for every stage; the padding share is reported beside it. The first window holds compilation
    and warm-up, so `steady_state` sums the windows after it. Recompiles are the graphs Dynamo
    compiled after the first step, which compiles the step: a new shape at step 2 counts, though
    its window is the first (GRPO's one recompile fell there and went uncounted, H100, 2026-12-06).
    The count is the process's: under DeepSpeed with compile, the first validation of the compiled
    engine counts too.
    """

    def __init__(self, device: torch.device, dist):
        self.device, self.dist = device, dist
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.windows = 0
        self.steady = {"tokens": 0, "padding": 0, "seconds": 0.0}
        self.warm_graphs: int | None = None  # graphs compiled by the end of the first step
        self._reset()
        self.restart_clock()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.extras: dict[str, torch.Tensor] = {}
        self.tokens, self.padding, self.steps = 0, 0, 0

    def restart_clock(self) -> None:
        """Tokens/s counts from here (after a log point's validation and logging, not during them)."""
        self.start = time.perf_counter()

    def add_micro_batch(self, batch: dict, loss: torch.Tensor, extras: dict, grad_accum: int) -> torch.Tensor:
        """Count one micro-batch (this process's positions and padding; `close` sums them over the
        processes); returns its share of the step's loss. It and the extras are kept as new tensors
        (the division copies): the next CUDA graph replay overwrites the ones the step returned."""
        self.tokens += batch["input_ids"].numel()
        if "padding" in batch:
            self.padding += int(batch["padding"].sum())
        for name, value in extras.items():
            self.extras[name] = self.extras.get(name, 0) + value.detach().float() / grad_accum
        return loss.detach().float() / grad_accum

    def end_step(self, step: int, step_loss: torch.Tensor) -> None:
        self.first_bad_step.masked_fill_(~torch.isfinite(step_loss) & (self.first_bad_step < 0), step)
        self.loss += step_loss
        self.steps += 1
        if self.warm_graphs is None:
            self.warm_graphs = compiled_graphs()

    def close(self, last_good: Callable[[], Path | None]) -> dict:
        """train/loss, train/<extra>, tokens_per_sec and padding_share of the window (the same on
        every process), and the recompiles since the first step; then the sums
        start again (the clock, at `restart_clock`). Raises NonFiniteLossError naming the step and
        the checkpoint `last_good()` says is kept."""
        if self.dist.enabled:  # the mean over ranks; positions and padding summed (shares differ)
            for value in (self.loss, *self.extras.values()):
                torch.distributed.all_reduce(value)
                value /= self.dist.world_size
            torch.distributed.all_reduce(self.first_bad_step, torch.distributed.ReduceOp.MAX)
            counts = torch.tensor([self.tokens, self.padding], device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            self.tokens, self.padding = (int(c) for c in counts.tolist())
        if self.first_bad_step.item() >= 0:
            kept = last_good()
            kept = f"the last good checkpoint, {kept}, is kept: rerun to resume from it" if kept \
                else "nothing was saved"
            raise NonFiniteLossError(f"loss became non-finite at step {self.first_bad_step.item() + 1}; "
                                     f"lower the learning rate or check the data; {kept}")
        seconds = time.perf_counter() - self.start  # after .item(): the GPU has done the window's work
        metrics = {"train/loss": (self.loss / self.steps).item(),  # the one host sync per interval
                   "tokens_per_sec": self.tokens / seconds, "padding_share": self.padding / max(1, self.tokens)}
        if self.extras:
            values = (torch.stack(list(self.extras.values())) / self.steps).tolist()
            metrics.update({f"train/{name}": v for name, v in zip(self.extras, values)})
        if self.windows > 0:
            for key, value in (("tokens", self.tokens), ("padding", self.padding), ("seconds", seconds)):
                self.steady[key] += value
        metrics["recompiles"] = self.recompiles()
        self.windows += 1
        self._reset()
        return metrics

    def steady_state(self, first_window: dict) -> dict:
        """Throughput after warm-up (the first window's when the run had only one) and recompiles."""
        if self.windows < 2:  # (a resumed run with nothing left to do: an older version's history)
            return {"tokens_per_sec": first_window.get("tokens_per_sec", 0.0),
                    "padding_share": first_window.get("padding_share", 0.0), "recompiles": self.recompiles()}
        return {"tokens_per_sec": self.steady["tokens"] / self.steady["seconds"],
                "padding_share": self.steady["padding"] / max(1, self.steady["tokens"]),
                "recompiles": self.recompiles()}

    def recompiles(self) -> int:
        """Graphs Dynamo compiled after the first step (0 before it ran)."""
        return 0 if self.warm_graphs is None else compiled_graphs() - self.warm_graphs


class BestWeights:
    """The weights of the lowest validation loss so far, on the CPU (cfg.keep == "best").

    Offered at every eval point; kept in resumable checkpoints, so a resumed run still ends on
    the best weights of the whole run.
    """

    def __init__(self, keep: str, saved: dict | None = None, weights: dict | None = None):
        self.enabled = keep == "best"
        saved = saved if self.enabled else None  # a run resumed with keep: last forgets them
        self.step, self.loss = (saved["step"], saved["loss"]) if saved else (None, math.inf)
        self.weights = (weights or None) if saved else None

    def offer(self, step: int, loss: float, engine) -> None:
        if self.enabled and loss < self.loss:  # the same on every rank: the loss is their mean
            self.step, self.loss = step, loss
            self.weights = engine.full_weights()  # copies: training goes on

    def stalled(self, step: int, cfg: TrainConfig) -> bool:
        """Whether `cfg.patience` evaluations in a row have not beaten the best one: the weights
        kept are then settled, and the rest of the run (same schedule) would only be discarded."""
        return self.enabled and cfg.patience > 0 and self.step is not None \
            and step - self.step >= cfg.patience * cfg.eval_interval

    def state(self) -> dict | None:
        return {"step": self.step, "loss": self.loss} if self.step is not None else None

    def restore_into(self, model: torch.nn.Module) -> None:
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        if set(missing) - {"lm_head.weight"} or unexpected:  # a tied lm_head is not saved apart
            raise ValueError(f"best weights do not match the model (missing {missing}, unexpected {unexpected})")


class ResumableCheckpoints:
    """When and what to save so a killed run continues exactly; what to start from when one exists.

    Checkpoints are written at the first log point at or after each multiple of `interval` (the
    metrics window is then empty, so the history holds everything), never at the last step (the
    stage's own checkpoint follows). Rank 0 writes them on a thread of its own
    (`resume.BackgroundWriter`), from the engine's copies taken at that step, while training goes
    on; `last_good` is the newest one known to be on disk.
    """

    def __init__(self, run: TrainingRun, model: torch.nn.Module, cfg: TrainConfig, inputs: Iterable[Path]):
        self.run, self.point, self.fingerprint = run, None, ""
        self.writer = resume.BackgroundWriter()
        self.writing: Path | None = None  # the one being written
        self.config = run.checkpoint if run.checkpoint_dir is not None else None
        if self.config is not None:
            geometry = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len}
            self.fingerprint = resume.run_fingerprint(model, geometry, inputs)
            if self.config.resume == "auto":
                self.point = resume.load_newest(run.checkpoint_dir, self.fingerprint)
        self.last_good = self.point.path if self.point is not None else None
        start = self.point.step if self.point is not None else 0
        interval = self.config.interval if self.config is not None else 0
        self.next_step = (start // interval + 1) * interval if interval else None

    def take_start(self) -> tuple[dict, dict] | None:
        """(weights, optimizer state) to build the engine from, once; the point is then dropped."""
        point, self.point = self.point, None
        return (point.weights, point.optim) if point is not None else None

    def due(self, steps_done: int, last: bool) -> bool:
        return self.next_step is not None and steps_done >= self.next_step and not last

    def save(self, steps_done: int, engine, state: dict, best: BestWeights) -> None:
        """A collective call (every process gathers its share); rank 0 hands the write to its thread,
        once the one before is done (so at most two copies of the state are held at once)."""
        self.wait()
        weights, optim = engine.full_state()
        rng = resume.rng_states(self.run.dist)
        if self.run.dist.is_main:
            state = copy.deepcopy({"fingerprint": self.fingerprint, "world_size": self.run.dist.world_size,
                                   "best": best.state(), **state})  # the history goes on growing
            self.writer.submit(functools.partial(resume.save_resume_point, self.run.checkpoint_dir, steps_done,
                                                 weights, optim, rng, state, self.config.keep, best.weights or {}))
        self.writing = resume.step_dir(self.run.checkpoint_dir, steps_done)
        self.next_step = steps_done // self.config.interval * self.config.interval + self.config.interval

    def wait(self) -> None:
        """Until the checkpoint being written is on disk; raises if writing it failed."""
        self.writer.wait()
        if self.writing is not None:
            self.last_good, self.writing = self.writing, None

    def kept(self) -> Path | None:
        """The newest checkpoint on disk, once any write in progress has ended (for an error
        message: a failed write is logged, not raised, so that the error being reported stays the
        one raised)."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001  (logged by the writer when it failed)
            self.writing = None
        return self.last_good


def _restore(checkpoints: ResumableCheckpoints, batches, logger, dist, cfg: TrainConfig
             ) -> tuple[int, int, list, BestWeights]:
    """Take back a resumed run's step, micro-batch count, metrics history, best weights, RNG and
    data position; (0, 0, [], no best weights) for a fresh run."""
    point = checkpoints.point
    if point is None:
        return 0, 0, [], BestWeights(cfg.keep)
    resume.restore_rng(point.rng, dist)
    if point.state["data"] is not None:
        batches.load_state(point.state["data"])
    if dist.is_main:
        log.info("resuming from %s (step %d of %d, written by %d process(es))", point.path, point.step,
                 cfg.max_steps, point.state["world_size"])
    history = point.state["history"]
    for entry in history:  # the curve so far, so dvclive's plots are whole again
        logger.log(entry["step"], {k: v for k, v in entry.items() if k != "step"})
    best = BestWeights(cfg.keep, point.state.get("best"), point.best)
    return point.step, point.state["micro_batches"], history, best


def fit(model: torch.nn.Module, objective: Callable, batches: Iterable[dict], cfg: TrainConfig,
        runtime: RuntimeConfig, *, run: TrainingRun | None = None,
        val_batches: Callable[[], Iterable[dict]] | None = None, flops_per_token: float | None = None,
        inputs: Iterable[Path] = (), fixed_shapes: bool = False) -> FitResult:
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
        fixed_shapes: every batch has the same shape (packed rows), so on one GPU the compiled
            step may replay as CUDA graphs (`runtime.cuda_graphs`).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the message names the step and the
            last good resumable checkpoint, which is kept).
    """
    startup = {"setup_seconds": process_seconds()}  # the stage's own work before fit: imports, data, loading
    compiled_before = compile_timers(), compile_cache_counts()  # a process may fit twice (tests, benches)
    clock = fit_started = time.perf_counter()  # one clock from here on: the parts add up to the start-up
    run = run or TrainingRun()
    dist, logger = run.dist, run.logger or NullLogger()
    device = resolve_device(runtime, dist)
    dtype = resolve_dtype(runtime, device)
    cpu_threads.configure(runtime.threads, device)
    if device.type == "cuda":  # start CUDA here (if the stage has not), so the engine's time is its own
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device if device.index is not None else None)  # as in _first_step
    startup["device_seconds"], clock = time.perf_counter() - clock, time.perf_counter()
    checkpoints = ResumableCheckpoints(run, model, cfg, inputs)
    start_step, micro_batches, history, best = _restore(checkpoints, batches, logger, dist, cfg)
    result = FitResult(history=history)
    startup["resume_seconds"], clock = time.perf_counter() - clock, time.perf_counter()
    engine = make_engine(model, cfg, runtime, dist, device, dtype, run.distributed, start=checkpoints.take_start(),
                         fixed_shapes=fixed_shapes)
    startup["engine_seconds"] = time.perf_counter() - clock
    peak = peak_flops(device)
    it = iter(batches)
    if micro_batches and not hasattr(batches, "load_state"):
        it = itertools.islice(it, micro_batches, None)  # skip what the interrupted run already used
    window = MetricsWindow(device, dist)
    speed: dict = {}
    val_loss, stop = None, False
    bar = tqdm(range(start_step, cfg.max_steps), desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main, initial=start_step, total=cfg.max_steps)
    try:
        for step in bar:
            cpu_threads.follow()
            lr = lr_at(step, cfg)
            engine.set_lr(lr)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = next(it)
                micro_batches += 1
                loss, extras = engine.forward_backward(objective, to_device(batch, device), micro == cfg.grad_accum - 1)
                step_loss += window.add_micro_batch(batch, loss, extras, cfg.grad_accum)
            grad_norm = engine.complete_step()
            window.end_step(step, step_loss)
            if step == start_step:
                speed = _first_step(device, window, dist, startup, fit_started, compiled_before)
                speed["cuda_graphs"] = int(engine.replays_graphs)

            last = step == cfg.max_steps - 1
            if (step + 1) % cfg.log_interval != 0 and not last:
                continue
            metrics = {**window.close(checkpoints.kept), "lr": lr, "grad_norm": float(grad_norm)}
            if peak and flops_per_token:  # tokens/s of all processes against all their GPUs' peak
                metrics["mfu"] = flops_per_token * metrics["tokens_per_sec"] / (peak * dist.world_size)
            if val_batches is not None and ((step + 1) % cfg.eval_interval == 0 or last):
                val_loss = evaluate(engine.eval_model, objective, val_batches(), device, dtype, cfg.eval_batches, dist)
                metrics["val/loss"] = val_loss
                best.offer(step + 1, val_loss, engine)
                stop = best.stalled(step + 1, cfg) and not last
            logger.log(step + 1, metrics)
            if dist.is_main:
                log.info("step %d/%d | loss %.4f | lr %.2e | %.1fk tok/s%s", step + 1, cfg.max_steps,
                         metrics["train/loss"], lr, metrics["tokens_per_sec"] / 1e3,
                         f" | val {val_loss:.4f}" if "val/loss" in metrics else "")
            result.history.append({"step": step + 1, **metrics})
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['tokens_per_sec'] / 1e3:.1f}k",
                            refresh=False)
            if stop:
                if dist.is_main:
                    log.info("stopping at step %d of %d: %d evaluations have not beaten step %d's validation loss "
                             "(patience)", step + 1, cfg.max_steps, cfg.patience, best.step)
                break
            if checkpoints.due(step + 1, last):
                data = batches.state() if hasattr(batches, "state") else None
                checkpoints.save(step + 1, engine, {"micro_batches": micro_batches, "history": result.history,
                                                    "data": data}, best)
            window.restart_clock()  # validation, logging and checkpoints are not training time
    except BaseException:
        checkpoints.kept()  # the resume point being written, if any, is on disk before this error goes on
        raise
    checkpoints.wait()  # and before fit returns (raising if writing it failed)
    bar.close()
    engine.finish()
    first_window = next((h for h in result.history if h["step"] > start_step), result.history[-1])
    result.final = {**{k: v for k, v in result.history[-1].items() if k.startswith("train/")},
                    **window.steady_state(first_window), **speed}
    if peak and flops_per_token:
        result.final["mfu"] = flops_per_token * result.final["tokens_per_sec"] / (peak * dist.world_size)
    if val_loss is not None:
        lowest = min(h["val/loss"] for h in result.history if "val/loss" in h)
        result.final.update(_kept(model, best, val_loss, result.history[-1]["step"], dist),
                            **{"val/best_loss": lowest})
    return result


def _first_step(device: torch.device, window: MetricsWindow, dist, startup: dict, fit_started: float,
                compiled_before: tuple[dict[str, float], dict[str, int]]) -> dict:
    """Start-up as a user sees it: from the process start to the first step done (one host sync),
    and its parts: the stage's own work before calling `fit` (`setup_seconds`); starting the device
    (`device_seconds`; a stage that used the GPU before `fit`, like DPO's reference pass, started it
    in its setup); the resume check (`resume_seconds`: fingerprinting the weights, code and data,
    reading a resumable checkpoint if there is one); building the engine (`engine_seconds`: the
    model to the device, a resumed run's weights and optimizer state, the compile wrapper, the
    optimizer, DDP or DeepSpeed); and the first step with its batch (`first_step_seconds`, mostly
    compiling on a GPU: `compile_seconds`, Dynamo's and Inductor's time since `fit` began, split
    in the log by `runtime.compile_seconds`; `compile_cache_hits` / `compile_cache_misses`: its
    graphs found in Inductor's cache on disk / compiled anew)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device if device.index is not None else None)  # "cuda" names no index
    now = time.perf_counter()
    speed = {"startup_seconds": startup["setup_seconds"] + now - fit_started, **startup,
             "first_step_seconds": now - window.start}
    timers, cache = compiled_before
    compiling = compile_seconds(since=timers)
    compiled = ""
    if compiling:
        now = compile_cache_counts()
        hits, misses = now["hits"] - cache["hits"], now["misses"] - cache["misses"]
        speed.update(compile_seconds=compiling["compile"], compile_cache_hits=hits, compile_cache_misses=misses)
        compiled = ("; compiling in all: {compile:.1f} s (Dynamo's tracing {tracing:.1f}, the forward "
                    "{forward:.1f}, the backward {backward:.1f}; of those two, waiting for kernel builds "
                    "{waiting:.1f}; graphs from the compile cache: {hits} of {graphs})").format(
                        **compiling, hits=hits, graphs=hits + misses)
    if dist.is_main:
        log.info("first step done %.1f s after the process started (the stage's setup: %.1f s; starting the device: "
                 "%.1f s; the resume check: %.1f s; the engine: %.1f s; the step itself: %.1f s)%s",
                 speed["startup_seconds"], speed["setup_seconds"], speed["device_seconds"], speed["resume_seconds"],
                 speed["engine_seconds"], speed["first_step_seconds"], compiled)
    return speed


def _kept(model: torch.nn.Module, best: BestWeights, last_loss: float, last_step: int, dist) -> dict:
    """Put the best weights back when they are not the last ones; say which were kept."""
    kept_step, kept_loss = last_step, last_loss
    if best.weights is not None and best.loss < last_loss:
        best.restore_into(model)
        kept_step, kept_loss = best.step, best.loss
        if dist.is_main:
            log.info("keeping the weights of step %d (val loss %.4f); the last step's val loss was %.4f",
                     best.step, best.loss, last_loss)
    return {"val/loss": kept_loss, "val/last_loss": last_loss, "kept_step": kept_step}
