#!/bin/bash
# One device call for issue 20: `tinyllm bench serve` at 768x8 with the batcher patched to
# batch-invariant kernels (reports/serving/invariant_kernels_h100/batcher.patch: no cuDNN
# attention, fp32 partial sums in bf16 matmuls), then as committed, in one call so the throughputs
# compare as ratios. Run on an H100 on 2026-12-06 (reports/serving.md); the patch was not kept.
# Carry .whl and artifacts/grpo. About 25 s of install + 2 x 150 s at most.
#   bash reports/bench/gpu/invariant_serve_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/log.txt"
serve() {
    echo "## bench serve: $1" | tee -a "$out/log.txt"
    timeout 170 tinyllm bench serve artifacts/grpo --model 768x8 --device cuda --clients 1,8,32 --slots 32 --requests 4 \
        --max-tokens 256 --out "$out/serve_$1" 2>&1 | grep -v -i warn | tail -12 | tee -a "$out/log.txt" \
        || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
}
git apply reports/serving/invariant_kernels_h100/batcher.patch
serve invariant
git apply -R reports/serving/invariant_kernels_h100/batcher.patch
serve base
tar czf "$out/serve.tgz" -C "$out" serve_invariant serve_base 2>/dev/null
