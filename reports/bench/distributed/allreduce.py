"""NCCL all-reduce bandwidth between the GPUs of one host: what DDP's gradient sync can reach.

    torchrun --standalone --nproc_per_node 2 reports/bench/distributed/allreduce.py
"""
import os
import time

import torch
import torch.distributed as dist

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
for numel, dtype in [(57_000_000, torch.float32), (57_000_000, torch.bfloat16), (25_000_000, torch.float32)]:
    x = torch.ones(numel, dtype=dtype, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 20 * 1e3
    size = numel * x.element_size()
    n = dist.get_world_size()
    if rank == 0:
        bus_gbs = 2 * (n - 1) / n * size / ms / 1e6
        print(f"all_reduce {size / 1e6:.0f} MB {dtype}: {ms:.2f} ms, bus bandwidth {bus_gbs:.0f} GB/s")
dist.destroy_process_group()
