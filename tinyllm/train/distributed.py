"""Processes and ranks: one process per GPU under torchrun (or CPU processes with gloo), and the run
around `fit` (logger, strategy, resumable checkpoints).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and nothing
here does anything. Rank 0 alone logs and writes; every rank trains on its own share of each batch.

    with training_run("pretrain", params) as run:   # relaunches under torchrun if params ask
        run_pretrain(params, ..., run=run)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from tinyllm.config import CheckpointConfig, DistributedConfig, Params
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.train.runtime import STARTED_AT, process_seconds, process_started_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); a no-op alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend)
    return Dist(rank, world_size, local_rank)


def close_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def rank_share(batches: Iterable[dict], dist: Dist) -> Iterator[dict]:
    """This rank's rows (rank, rank + N, ...) of every global batch. Every rank builds the same global
    batch, which is cheap next to a training step, and keeps its share. A DPO batch (`pack_pairs`
    with shares = N) interleaves the processes' packs, so the rows [rank::N] hold this rank's whole
    pairs, and its reference log-probs (B chosen, then B rejected; B divisible by N) [rank::N] are
    theirs, chosen sides first.

    A next-token batch's share also gets "token_weight" = N / (labelled tokens in the global batch):
    shares of a chat batch hold different numbers of reply tokens (or none), so each rank sums its
    token losses and scales by this; DDP's mean over ranks is then the global batch's token mean.
    """
    for batch in batches:
        if not dist.enabled:
            yield batch
            continue
        share = {key: rows[dist.rank::dist.world_size] for key, rows in batch.items()}
        if "ref_logps" not in batch:
            share["token_weight"] = torch.tensor(dist.world_size / max(1, int((batch["labels"] != IGNORE_INDEX).sum())))
        yield share


def check_divisible(section: str, batch_size: int, dist: Dist) -> None:
    """The global batch must split evenly over the processes (so N does not change what is trained)."""
    if batch_size % dist.world_size:
        from tinyllm.errors import ConfigError

        raise ConfigError(f"{section}.batch_size={batch_size} must be divisible by the {dist.world_size} processes")


@dataclass
class TrainingRun:
    """What `fit` needs from around it. The default is one process, no logging, no resumable
    checkpoints (tests, benchmarks); `training_run` builds the pipeline's."""

    dist: Dist = field(default_factory=Dist)
    logger: object = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(interval=0))
    checkpoint_dir: Path | None = None
    """Where resumable checkpoints go (checkpoints/<stage>); None: none are written or read."""


def relaunch_command(distributed: DistributedConfig) -> list[str] | None:
    """The torchrun command that reruns this stage with `distributed.nproc` processes, or None when
    this process should train itself (one process and DDP, or already started by a launcher).
    DeepSpeed always wants a launcher's environment, even for one process."""
    if "WORLD_SIZE" in os.environ or (distributed.nproc == 1 and distributed.strategy == "ddp"):
        return None
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    target = ["-m", spec.name] if spec is not None else [main.__file__]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(distributed.nproc), *target]


@contextlib.contextmanager
def training_run(stage: str, params: Params):
    """A training stage's run: `with training_run("sft", params) as run: ...`.

    When params ask for several processes (or DeepSpeed) and no launcher started this one, the
    stage replaces itself with `torchrun --standalone --nproc_per_node N -m stages.<stage>`.
    Rank 0 alone gets the dvclive logger (reports/live/<stage>) and should write outputs
    (`run.dist.is_main`). Resumable checkpoints go to checkpoints/<stage>/ and are removed when the
    stage finishes.
    """
    from tinyllm.train import resume
    from tinyllm.train.logging import LiveLogger

    command = relaunch_command(params.distributed)
    if command is not None:
        log.info("relaunching: %s", " ".join(command))
        os.environ.setdefault(STARTED_AT, str(process_started_at()))  # start-up counts from here
        sys.stdout.flush()
        os.execv(command[0], command)
    dist = init_distributed()
    run = TrainingRun(dist, LiveLogger(Path("reports/live") / stage) if dist.is_main else None, params.distributed,
                      params.checkpoint, Path("checkpoints") / stage)
    try:
        yield run
        if dist.is_main:
            resume.clear(run.checkpoint_dir)
    finally:
        if run.logger is not None:
            run.logger.close()
        close_distributed()
    if dist.is_main:  # what comes after this line in a pipeline's log is the process's exit and DVC's commit
        log.info("%s: done %.1f s after the process started", stage, process_seconds())
