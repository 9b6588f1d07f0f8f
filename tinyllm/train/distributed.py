"""Processes and ranks: one process per GPU under torchrun (or one CPU process for tests with gloo).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and nothing
here does anything. Rank 0 alone logs and writes; every rank trains on its own share of each batch.

    dist = init_distributed(runtime)      # Dist(rank=0, world_size=1, ...) when not under torchrun
    ...
    close_distributed()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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
