"""How many CPU threads torch uses in a stage: fixed (the default), or following the free cores.

The thread count changes the trained weights: a weight's gradient sums over every position of the
batch, and torch splits that sum between its threads, so 1 and 2 threads round differently (the
default model's weights after 20 steps differ bitwise, fp32 and bf16, while the forward is
identical). A fixed count (`runtime.threads: auto` or N) gives the same weights on every run on
this machine, whatever else runs beside it.

`follow` trades that for speed when the CPU is shared. PyTorch's CPU kernels run on OpenMP threads
that spin while they wait for each other. When another program holds one of the cores, the
thread on that core runs in bursts and the others spin for it: on 2 cores, with one busy program
beside it, pretraining ran 3.1× slower than alone, where fair sharing costs 2×
(reports/cpu_sharing.md). OpenMP's passive wait policy fixes that but costs 25% on an idle
machine. So with `follow` a stage that trains or evaluates on the CPU calls `follow()` as it goes
(every step: it is a clock read between checks): every 2 s it reads how much CPU other programs
used (Linux's /proc/stat, minus this process's own time) and sets torch to one thread per core
they left free, back up to torch's own default when they stop.

    cpu_threads.configure(runtime.threads, device)   # once, at the start of a stage
    cpu_threads.follow()                             # often (does nothing unless following)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from tinyllm.model.transformer import Transformer

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
CHECK_EVERY = 2.0
"""Seconds between looks at the machine's load (each look is two small reads)."""

_warmed_up: set[torch.dtype] = set()
"""The autocast dtypes `warm_up` has run in, in this process."""
_follower: FreeCoreFollower | None = None
_torch_default_threads: int | None = None
"""torch's own thread count, read before this module first changed it."""


def threads_for(others_busy: float, cores: int, most: int) -> int:
    """Threads to use when other programs keep `others_busy` cores busy (rounded to whole cores)."""
    return max(1, min(most, int(cores - others_busy + 0.5)))


def _busy_seconds() -> float | None:
    """CPU seconds all programs have spent busy since boot (None where /proc/stat is missing)."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class FreeCoreFollower:
    """Samples the machine's busy time and this process's own; sets torch's thread count from the difference."""

    def __init__(self, most: int, every: float = CHECK_EVERY):
        self.most, self.every, self.cores = most, every, os.cpu_count() or 1
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        return time.monotonic(), _busy_seconds() or 0.0, time.process_time()

    def follow(self) -> None:
        now = time.monotonic()
        if now - self._last[0] < self.every:
            return
        sample = self._sample()
        wall, busy, own = (new - old for new, old in zip(sample, self._last))
        self._last = sample
        threads = threads_for(max(0.0, busy - own) / wall, self.cores, self.most)
        if threads != torch.get_num_threads():
            log.info("other programs are using %.1f of %d cores: %d torch thread(s)", max(0.0, busy - own) / wall,
                     self.cores, threads)
            torch.set_num_threads(threads)


def configure(threads: int | str, device: torch.device) -> None:
    """`threads` N: exactly N. `auto`: torch's own count. `follow`: start there and follow the free
    cores (on Linux, and unless OMP_NUM_THREADS says how many). On a GPU nothing changes."""
    global _follower, _torch_default_threads
    _follower = None
    if device.type != "cpu":
        return
    _torch_default_threads = _torch_default_threads or torch.get_num_threads()
    if isinstance(threads, int):
        torch.set_num_threads(threads)
        return
    torch.set_num_threads(_torch_default_threads)
    if (threads == "follow" and "OMP_NUM_THREADS" not in os.environ and _busy_seconds() is not None
            and _torch_default_threads > 1):
        _follower = FreeCoreFollower(most=_torch_default_threads, every=CHECK_EVERY)


def follow() -> None:
    """Adjust the thread count if `configure` asked to follow the free cores and it is time to look."""
    if _follower is not None:
        _follower.follow()


def warm_up(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Before a CPU stage's real work, run a small model of `model`'s architecture once on one thread.

    torch's first call of some vectorized CPU kernels in a process, when two threads make it at
    once, sometimes computes part of its result wrong: a float64 cos came out 7e-9 off in the
    second thread's half of a table in 1 process of 7, and pretraining's weights after 20 steps
    differed between runs of the same params in 2 of 12 (reports/quality.md). Once a kernel has
    run on one thread, later calls agree (20 runs of 20). So this runs a copy of the architecture
    with one decoder layer of each kind — forward and backward on causal and on packed rows, and
    an AdamW step — in fp32 and under `dtype` autocast, keeping torch's random state. It costs a
    fraction of a second, once per dtype and process; on a GPU it does nothing."""
    base = next((m for m in model.modules() if isinstance(m, Transformer)), None)
    if base is None or device.type != "cpu" or dtype in _warmed_up:
        return
    cfg = base.config
    layers = cfg.moe.first_dense_layers + 1 if cfg.moe.enabled else 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            tiny = Transformer(dataclasses.replace(cfg, n_layers=layers))
            optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
            ids = torch.randint(0, cfg.vocab_size, (2, min(cfg.max_seq_len, 64) + 1))
            segments = torch.arange(ids.shape[1] - 1).expand(2, -1) // 16
            for autocast in (torch.float32,) if dtype == torch.float32 else (torch.float32, dtype):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == torch.bfloat16):
                    loss = tiny(ids[:, :-1], labels=ids[:, 1:]).loss
                    loss = loss + tiny(ids[:, :-1], segments=segments).logits.float().mean()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    _warmed_up.add(dtype)
