"""Device, precision, compilation and hardware peak FLOPs: what the loop needs to know about the machine."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import psutil
import torch

from tinyllm import cpu_threads
from tinyllm.config import COMPILE_MODES, RuntimeConfig, compile_problem
from tinyllm.errors import ConfigError

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per card (vendor datasheets), for MFU.
PEAK_BF16_FLOPS = {
    "H100 80GB HBM3": 989e12,  # the SXM card's name in torch
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def resolve_device(cfg: RuntimeConfig, dist=None) -> torch.device:
    """`auto` picks CUDA when present (GPU LOCAL_RANK under torchrun); asking for CUDA on a machine
    without it is an error, and so is naming one GPU for several processes (they would all share it)."""
    if cfg.device.startswith("cuda:") and dist is not None and dist.enabled:
        raise ConfigError(f"runtime.device={cfg.device!r} names one GPU, but {dist.world_size} processes each need "
                          "their own; use auto or cuda (each process takes GPU LOCAL_RANK), and pick the GPUs "
                          "with CUDA_VISIBLE_DEVICES")
    if cfg.device == "auto" or (cfg.device == "cuda" and dist is not None and dist.enabled):
        if not torch.cuda.is_available():
            if cfg.device == "cuda":
                raise ConfigError("runtime.device='cuda' but this machine has no CUDA GPU; use auto or cpu")
            return torch.device("cpu")
        return torch.device("cuda", dist.local_rank if dist is not None else torch.cuda.current_device())
    if cfg.device.startswith("cuda"):
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device={cfg.device!r} but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s); use auto or cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: RuntimeConfig, device: torch.device) -> torch.dtype:
    """Autocast dtype. auto: bf16 on CUDA and on a CPU where bf16 matmuls run faster, else fp32.

    On one 2-core dev VM (AVX512-BF16) a bf16 matmul ran at 2.2x fp32's speed and the default
    `dvc repro` took 8 min instead of 11 (reports/quality.md); on another with the same flags, at
    half fp32's speed, and pretraining took 433 s instead of 235. So on a CPU the instructions
    are asked for and then the speed is measured (`cpu_bf16_is_faster`)."""
    if cfg.dtype == "auto":
        faster = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_faster())
        return torch.bfloat16 if faster else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX; read from Linux's
    /proc/cpuinfo, so False elsewhere). torch's own mkldnn check also says yes to plain AVX-512,
    where bf16 is emulated."""
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_MARGIN = 1.1
"""How much faster than fp32 a bf16 matmul must run on a CPU for `runtime.dtype: auto` to pick bf16.
The two dev VMs measured 2.2x (on all threads, by the clock) and 0.53-0.73x (`bf16_matmul_speedup`),
far on either side, so the pick does not flip between runs; `runtime.dtype` pins it where it might."""


def bf16_matmul_speedup(rounds: int = 10, matmuls: int = 3) -> float:
    """fp32's time over bf16's for a matmul of the default model's shapes (2,048 x 192 by 192 x 512),
    the fastest of `rounds` rounds of each, taken in turns, on one thread and timed by that thread's
    CPU time: other programs then change what it measures little. Timed by the clock, with four
    processes compiling beside it on 2 cores, one process measured 1.11x where the others measured
    0.91-1.00x and picked another dtype than they did; by CPU time, with three busy programs beside it,
    0.53-0.73x, as on the idle VM. About 0.25 s. Made of ones, not random numbers, so a stage's
    random draws (its weights, its data order) do not depend on this check."""
    operands = {dtype: (torch.ones(2048, 192, dtype=dtype), torch.ones(192, 512, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    with cpu_threads.one_thread():
        for _ in range(rounds):  # the first round also sets the kernels up: the fastest is a later one
            for dtype, (a, b) in operands.items():
                start = time.thread_time()
                for _ in range(matmuls):
                    a @ b
                best[dtype] = min(best[dtype], time.thread_time() - start)
    return best[torch.float32] / best[torch.bfloat16]


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether this CPU has bf16 instructions and bf16 matmuls run at least `BF16_MARGIN` times as
    fast as fp32's here (once a process; logged, since it decides `runtime.dtype: auto`)."""
    if not cpu_multiplies_bf16():
        return False
    speedup = bf16_matmul_speedup()
    faster = speedup >= BF16_MARGIN
    log.info("runtime.dtype auto: on this CPU a bf16 matmul runs at %.2fx fp32's speed, so %s "
             "(set runtime.dtype to choose)", speedup, "bf16 autocast" if faster else "fp32")
    return faster


def compiles(cfg: RuntimeConfig, device: torch.device) -> bool:
    """`runtime.compile`: auto compiles on a GPU only; a mode name compiles everywhere."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


INDUCTOR_OPTIONS = {"triton.mix_order_reduction_non_strict_mode": True}
"""The training engine's Inductor options. Inductor fuses the two sums of a norm's backward (over rows
and over columns) only above a size, and guards the graph on that size: GRPO's rollouts, whose rows
and lengths change every round, crossed it and recompiled the step (H100, 2026-12-06). Non-strict
mode fuses at every size, so no guard; the steps timed the same with it (768x8 at two shapes, 512x8
at 128 rows: reports/gpu_speed.md, "... a size guard in GRPO's step")."""


def compile_options(cfg: RuntimeConfig, cuda_graphs: bool = False) -> dict:
    """torch.compile's keyword arguments for `runtime.compile`: Inductor options, the named mode's
    among them (torch.compile takes a mode or options, not both), and CUDA graphs if asked for."""
    if problem := compile_problem(cfg.compile):  # a RuntimeConfig built in code skips parse_params' checks
        raise ConfigError(problem)
    mode = torch._inductor.list_mode_options(cfg.compile) if cfg.compile in COMPILE_MODES else {}
    graphs = {"triton.cudagraphs": True} if cuda_graphs else {}
    return {"options": {**mode, **INDUCTOR_OPTIONS, **graphs}}


def replays_cuda_graphs(cfg: RuntimeConfig, device: torch.device, *, processes: int, grad_accum: int,
                        fixed_shapes: bool, moe: bool) -> bool:
    """`runtime.cuda_graphs` for one stage. Graphs replay fixed shapes and buffers: a new batch shape
    records another graph (GRPO pads its rollouts and DPO its batches to one shape where this
    says yes); an MoE reads its routed counts on the host and updates its routing bias in place; a
    replay overwrites the previous one's gradients (so no accumulation over micro-batches); DDP's and
    DeepSpeed's hooks were not tried in a graph; and `runtime.compile: max-autotune-no-cudagraphs`
    says no to them."""
    return (cfg.cuda_graphs == "auto" and device.type == "cuda" and compiles(cfg, device)
            and cfg.compile != "max-autotune-no-cudagraphs" and processes == 1 and grad_accum == 1 and fixed_shapes
            and not moe)


def cuda_graph_skips() -> int:
    """Graphs Inductor compiled but would not replay as CUDA graphs (it logs why: a CPU tensor, an
    input changed in place, ...), in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile for a new shape adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


COMPILE_TIMERS = {"dynamo": "_compile.compile_inner", "backend": "OutputGraph.call_user_compiler",
                  "backward": "compile_fx.<locals>.bw_compiler", "at_first_run": "backward._backward_impl",
                  "waiting": "async_compile.wait"}
"""Dynamo's own timers (`dynamo_timed`) that `compile_seconds` reads: a frame's whole compile, the
backend's part of it (AOTAutograd and Inductor), the backward's compile, the backward's first run
(where it compiles lazily) and the wait for kernels built in Inductor's worker processes."""


def compile_timers() -> dict[str, float]:
    """The `COMPILE_TIMERS` summed over this process so far, in seconds (0 for one not run)."""
    from torch._dynamo.utils import compilation_time_metrics as timers

    return {name: sum(timers.get(key, ())) for name, key in COMPILE_TIMERS.items()}


def compile_seconds(since: dict[str, float]) -> dict[str, float]:
    """Seconds spent compiling since the `compile_timers()` snapshot `since`: "compile" in all, and
    its parts "tracing" (Dynamo reading the Python code into graphs), "forward" (AOTAutograd's
    joint graph and Inductor's forward kernels), "backward" (Inductor's backward kernels) and
    "waiting" (of those two, the wait for kernel builds). Empty if nothing compiled, or if the
    timers do not add up (renamed in another torch). A backward compiles inside the forward's
    compile when shapes are dynamic, else at its first run: only then is its time outside
    Dynamo's. The start-up of a compiled stage is mostly this (reports/gpu_speed.md); the parts
    say which kind of work to cut."""
    spent = {name: seconds - since.get(name, 0.0) for name, seconds in compile_timers().items()}
    inside = max(0.0, spent["backward"] - spent["at_first_run"])  # compiled within the forward's compile
    parts = {"compile": spent["dynamo"] + spent["at_first_run"], "tracing": spent["dynamo"] - spent["backend"],
             "forward": spent["backend"] - inside, "backward": max(spent["backward"], spent["at_first_run"]),
             "waiting": spent["waiting"]}
    return parts if spent["dynamo"] > 0 and min(parts.values()) >= 0 else {}


def compile_cache_counts() -> dict[str, int]:
    """Graphs Inductor found in its compile cache on disk ("hits": compiled by an earlier process,
    whatever its weights, as stages/compile_ahead.py arranges) and compiled anew ("misses"), in
    this process so far."""
    from torch._dynamo.utils import counters

    return {"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}


STARTED_AT = "TINYLLM_STARTED_AT"
"""Environment variable: when the stage began, set before it relaunches itself under torchrun."""


def process_started_at() -> float:
    """When this process started, in `time.time()`'s seconds. On Linux from the kernel's start time
    in clock ticks since boot (10 ms steps), against the clock since boot: psutil's create_time adds
    those ticks to a boot time the kernel gives in whole seconds, rounded down, which made every
    start-up up to 1 s too long (0.8 s on the dev VM)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        return psutil.Process().create_time()


def process_seconds() -> float:
    """Seconds since the stage started: what a user waits for, imports included (from the first
    process's start when the stage relaunched itself under torchrun)."""
    started = os.environ.get(STARTED_AT)
    return time.time() - (float(started) if started else process_started_at())


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast (weights stay fp32), or nothing for fp32.
    bf16 has fp32's exponent range, so no GradScaler is needed."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    """The card's bf16 peak, or None where unknown (CPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
