#!/bin/bash
# One device call for issue 22. First 512x8's autotuned matmuls (autotune_call.sh for that model:
# the default compile, then max-autotune-no-cudagraphs; tables in $OUT/tables.tgz). Then cold
# start-up by compile scope (reports/bench/gpu/compile_scope.py: whole model, nested layer regions,
# layers plus head compiled apart), 768x8 at 32 x 512, each scope in a fresh process with an empty
# inductor cache: the first step, the steps after it, and the gradients against the eager model's.
# Eager and per-layer were timed on an H200 on 2026-12-04; SCOPES=eager,whole,nested,layers,regional
# runs them all.
# Ran on an H100 on 2026-12-06 (reports/gpu_speed.md, "Compiling one layer for all the layers").
# About 25 s of install + 75 s + 180 s + 3 x 35 s at most. Carry .whl.
#   bash reports/bench/gpu/scope_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
AUTOTUNE_LIMIT=${AUTOTUNE_LIMIT:-180} MODELS="512x8 128" bash reports/bench/gpu/autotune_call.sh || exit 1  # installs, logs to $out/log.txt
timeout 240 python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 --batch-size 32 \
    --scopes "${SCOPES:-whole,nested,regional}" 2>&1 | grep -v -i warn | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
