"""Processes and ranks: one process per GPU under torchrun (or one CPU process for tests with gloo).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and nothing
here does anything. Rank 0 alone logs and writes; every rank trains on its own share of each batch.

    dist = init_distributed(runtime)      # Dist(rank=0, world_size=1, ...) when not under torchrun
    ...
    close_distributed()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from tinyllm.model.transformer import IGNORE_INDEX


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
    batch, which is cheap next to a training step, and keeps its share. For a DPO batch (B chosen
    rows, then their B rejected rows, B divisible by N) the share keeps each pair's two rows together:
    the chosen half of the share precedes its rejected half, in the same pair order.

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


@contextlib.contextmanager
def training_run(live_dir: Path):
    """A training stage's processes and logger: `with training_run(dir) as (dist, logger): ...`.

    Under `torchrun --nproc_per_node N -m stages.<stage>` every process trains its share; rank 0
    alone gets the dvclive logger (None elsewhere) and should write outputs (`dist.is_main`).
    """
    from tinyllm.train.logging import LiveLogger

    dist = init_distributed()
    logger = LiveLogger(live_dir) if dist.is_main else None
    try:
        yield dist, logger
    finally:
        if logger is not None:
            logger.close()
        close_distributed()
