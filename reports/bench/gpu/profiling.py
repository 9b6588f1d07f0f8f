"""The profiler's table of one step, shared by this folder's step benchmarks (dpo_step, lora_step)."""

from __future__ import annotations

import torch


def profile_table(run, device: torch.device) -> str:
    """The ten profiler events (ops and, on a GPU, the kernels they launched) that take the most
    CUDA time (on the CPU: CPU time) in one `run()`. Run it apart from timed steps: the profiler
    slows what it watches."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=10, max_name_column_width=60)
