#!/bin/bash
# One H200 device call of at most 9.5 minutes (each part has its time limit), ready for the next session that is lent one:
# 1. issue 22: LoRA's training step with and without CUDA graphs, and at 64 rows a step (reports/
#    gpu_speed.md, "LoRA's step waits on the host": the step is bound by 451 matmul launches; does
#    replaying it as a CUDA graph, or doubling the GPU work per launch, bring it to >= 60% of full
#    fine-tuning's positions/s at 32 rows?);
# 2. issue 20: `tinyllm bench serve` at 768x8, which now checks seeded replies as well as greedy
#    ones alone vs among 32 (reports/serving.md, 2026-12-05, third session).
# Carry .whl (../shared/tools/gpu-wheelhouse .whl gguf) and artifacts/grpo. Logs go to $OUT as
# each part runs, so a call cut by the time limit still reports.
#   bash reports/bench/gpu/lora_and_serve_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
lora="full,lora + new tokens"
for args in "--batch-size 32" "--batch-size 32 --cuda-graphs" "--batch-size 64"; do
    echo "## lora_step $args" | tee -a "$out/log.txt"
    timeout 110 python reports/bench/gpu/lora_step.py --model 768x8 --device cuda --seq-len 512 --kinds "$lora" \
        $args 2>&1 | grep -v -i warn | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
done
echo "## bench serve" | tee -a "$out/log.txt"
timeout 200 tinyllm bench serve artifacts/grpo --model 768x8 --device cuda --clients 1,8,32 --slots 32 --requests 4 \
    --max-tokens 256 --out "$out/serve" 2>&1 | grep -v -i warn | tail -8 | tee -a "$out/log.txt" \
    || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
