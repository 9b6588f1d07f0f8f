#!/bin/bash
# One device call for issue 22. First 512x8's autotuned matmuls (autotune_call.sh's first half: the
# default compile, then max-autotune-no-cudagraphs). Then cold start-up by compile scope
# (reports/bench/gpu/compile_scope.py: whole model, nested layer regions, layers plus head compiled
# apart), 768x8 at 32 x 512, each scope in a fresh process with an empty inductor cache: the first
# step, the steps after it, and the gradients against the eager model's. Eager and per-layer were
# timed on an H200 on 2026-12-04; SCOPES=eager,whole,nested,layers,regional runs them all.
# About 25 s of install + 75 s + 200 s + 3 x 35 s at most. Carry .whl.
#   bash reports/bench/gpu/scope_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/log.txt"
for compile in on max-autotune-no-cudagraphs; do
    limit=$([ "$compile" = on ] && echo 75 || echo 200)
    echo "## bench train --models 512x8 --batch-size 128 --compile $compile" | tee -a "$out/log.txt"
    timeout "$limit" tinyllm bench train --models 512x8 --batch-size 128 --seq-len 512 --dtype bfloat16 \
        --compile "$compile" --steps 60 --warmup 20 --name "autotune_512x8_$compile" --out "$out/tables" 2>&1 \
        | grep -v -i warn | tail -3 | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
done
timeout 240 python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 --batch-size 32 \
    --scopes "${SCOPES:-whole,nested,regional}" 2>&1 | grep -v -i warn | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
tar czf "$out/tables.tgz" -C "$out" tables 2>/dev/null && rm -r "$out/tables"
