#!/usr/bin/env bash
# How reports/bench/distributed/ was measured, on a 2-GPU machine (the device tool's nvidia-h200-x2).
#   throughput: 768×8 (bf16, seq 512, compile), 1 GPU vs 2 GPUs under DDP, 32 and 64 sequences per GPU
#   zero2:      the same under DeepSpeed ZeRO-2, 32 sequences per GPU
#   memory:     1536×16 (0.41B params, bf16, seq 512), 2 sequences per GPU (so model and optimizer state
#               dominate), DDP and ZeRO-1/2/3; and 2048×20 (0.92B) under DDP and ZeRO-3
#   all-reduce: NCCL bandwidth between the two GPUs
#   profile:    torch.profiler traces of the 1-GPU and the 2-GPU DDP step of the throughput run
# Usage: bash reports/bench/distributed/run.sh OUT_DIR [allreduce|throughput|zero2|memory|profile|all]
set -uo pipefail
out=${1:?OUT_DIR}; what=${2:-all}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
bench="-m tinyllm.cli bench train --dtype bfloat16 --seq-len 512 --out $out"
two="python3 -m torch.distributed.run --standalone --nproc_per_node 2"
if [[ $what == allreduce || $what == all ]]; then
  $two reports/bench/distributed/allreduce.py 2>&1 | tee "$out/allreduce.log" | grep -E '^all_reduce|Error'
fi
if [[ $what == throughput || $what == all ]]; then  # DDP, 32 and 64 sequences per GPU
  python3 $bench --models 768x8 --compile on --batch-size 32 --steps 40 --warmup 20 \
    --name ddp_1gpu 2>&1 | tee "$out/ddp_1gpu.log" | grep -E '^\||Error'
  $two $bench --models 768x8 --compile on --batch-size 64 --steps 40 --warmup 20 \
    --name ddp_2gpu 2>&1 | tee "$out/ddp_2gpu.log" | grep -E '^\||Error'
  python3 $bench --models 768x8 --compile on --batch-size 64 --steps 40 --warmup 20 \
    --name ddp64_1gpu 2>&1 | tee "$out/ddp64_1gpu.log" | grep -E '^\||Error'
  $two $bench --models 768x8 --compile on --batch-size 128 --steps 40 --warmup 20 \
    --name ddp64_2gpu 2>&1 | tee "$out/ddp64_2gpu.log" | grep -E '^\||Error'
fi
if [[ $what == zero2 || $what == all ]]; then  # ZeRO-2 throughput, 32 sequences per GPU
  python3 $bench --models 768x8 --compile on --strategy zero2 --batch-size 32 --steps 40 --warmup 20 \
    --name throughput_1gpu 2>&1 | tee "$out/throughput_1gpu.log" | grep -E '^\||Error'
  $two $bench --models 768x8 --compile on --strategy zero2 --batch-size 64 --steps 40 --warmup 20 \
    --name throughput_2gpu 2>&1 | tee "$out/throughput_2gpu.log" | grep -E '^\||Error'
fi
if [[ $what == memory || $what == all ]]; then
  python3 $bench --models 1536x16 --strategy ddp --batch-size 2 --steps 10 --warmup 5 \
    --name memory_1gpu 2>&1 | tee "$out/memory_1gpu.log" | grep -E '^\||Error'
  $two $bench --models 1536x16 --strategy ddp,zero1,zero2,zero3 --batch-size 4 --steps 10 --warmup 5 \
    --name memory_2gpu 2>&1 | tee "$out/memory_2gpu.log" | grep -E '^\||Error'
  $two $bench --models 2048x20 --strategy ddp,zero3 --batch-size 4 --steps 10 --warmup 5 \
    --name memory1b_2gpu 2>&1 | tee "$out/memory1b_2gpu.log" | grep -E '^\||Error'
fi
if [[ $what == profile || $what == all ]]; then
  python3 $bench --models 768x8 --compile on --batch-size 32 --steps 20 --warmup 20 --name profile_1gpu \
    --profile "$out/profile" 2>&1 | tee "$out/profile_1gpu.log" | grep -E '^\||^profile|Error'
  $two $bench --models 768x8 --compile on --batch-size 64 --steps 20 --warmup 20 --name profile_2gpu \
    --profile "$out/profile" 2>&1 | tee "$out/profile_2gpu.log" | grep -E '^\||^profile|Error'
fi
