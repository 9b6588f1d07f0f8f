#!/bin/bash
# One device call for issue 22's "512x8 >= 2.0M tokens/s" (reports/bench/NOTES.md: the GPU is busy
# 33.9 ms of a 34.9 ms step at batch 128, so 2.0M needs less GPU work per token, not fewer launches;
# matmuls are 45% of it, SwiGLU and RMSNorm kernels most of the rest). Does runtime.compile's
# max-autotune-no-cudagraphs mode (every matmul timed against Triton templates, elementwise work
# fused into them) take enough off? The default compile beside it in each table, same process.
# Then the same for 768x8 at the recipe's 32 rows. Carry .whl. Tables go to $OUT as each part ends.
#   bash reports/bench/gpu/autotune_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/log.txt"
for args in "--models 512x8 --batch-size 128" "--models 768x8 --batch-size 32"; do
    echo "## bench train $args" | tee -a "$out/log.txt"
    timeout 270 tinyllm bench train $args --seq-len 512 --dtype bfloat16 --compile on,max-autotune-no-cudagraphs \
        --steps 60 --warmup 20 --name "autotune_$(echo $args | cut -d' ' -f2)" --out "$out" 2>&1 | grep -v -i warn \
        | tail -5 | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
done
