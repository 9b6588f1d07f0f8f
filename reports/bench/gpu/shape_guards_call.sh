#!/bin/bash
# One device call (issue 22): the training step under changing batch shapes, with the engine's compile
# options and with Inductor's defaults, each in a fresh process with an empty compile cache
# (shape_guards.py); then LoRA's step with and without CUDA graphs on the same host (lora_step.py:
# on a slow host the step waits on kernel launches). Carry .whl.
#   bash reports/bench/gpu/shape_guards_call.sh
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" || exit 1
echo "| model | compile options | graphs after the first step | after all shapes / after timing | first step (s) | ms at 128 x 64 | ms at 32 x 512 |" | tee -a "$out/shape_guards.txt"
echo "|---|---|---|---|---|---|---|" | tee -a "$out/shape_guards.txt"
for strict in --strict ""; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python reports/bench/gpu/shape_guards.py --model 768x8 $strict 2>&1 \
        | grep -v -i warn | tail -2 | tee -a "$out/shape_guards.txt"
done
for graphs in "" --cuda-graphs; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python reports/bench/gpu/lora_step.py --model 768x8 --vocab 2048 \
        --kinds "full,lora + new tokens" $graphs 2>&1 | grep -v -i warn | tee -a "$out/lora_graphs.txt"
done
