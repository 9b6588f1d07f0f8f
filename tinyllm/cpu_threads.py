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

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
CHECK_EVERY = 2.0
"""Seconds between looks at the machine's load (each look is two small reads)."""

MATH_FUNCTIONS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1",
                  "floor", "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt",
                  "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")
"""Unary float functions torch may route to oneMKL's vector math (a superset does no harm)."""
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
    warm_up_math_kernels()
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


@functools.cache
def warm_up_math_kernels() -> None:
    """Call each of torch's vectorized float math functions once, on one thread, before real work.

    torch hands contiguous float32/float64 unary ops (exp, log, sqrt, sin, cos, ...) to oneMKL's
    vector math, which picks its kernel on a function's first call in the process. When two
    threads make that first call at once, one of them can run a low-accuracy kernel on its chunk
    (pytorch/pytorch#188792, oneMKL 2024.2 as bundled with these wheels): here a float64 cos came
    out 7e-9 off in half a table in 3 fresh processes of 40, and pretraining's weights after 20
    steps differed between runs of the same params in 2 of 12 (reports/quality.md). One call on
    one thread settles the choice for good. Once per process (cached), about 20 ms."""
    with one_thread():
        for dtype in (torch.float32, torch.float64):
            x = torch.linspace(0.1, 0.9, 64, dtype=dtype)
            for name in MATH_FUNCTIONS:
                getattr(torch, name)(x)


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block; the thread count it had (which changes the weights a
    stage trains) comes back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
