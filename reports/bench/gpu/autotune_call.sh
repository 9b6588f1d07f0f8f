#!/bin/bash
# One device call for issue 22's "512x8 >= 2.0M tokens/s" (reports/bench/NOTES.md: the GPU is busy
# 33.9 ms of a 34.9 ms step at batch 128, so 2.0M needs less GPU work per token, not fewer launches;
# matmuls are 45% of it, SwiGLU and RMSNorm kernels most of the rest). Does runtime.compile's
# max-autotune-no-cudagraphs mode (every matmul timed against Triton templates, elementwise work
# fused into them) take enough off? The default compile first, then the mode, each its own run and
# table (a run cut by its time limit loses only itself); 512x8 at 128 rows.
# On an H100 (2026-12-06) the mode did not finish 512x8 in 180 s: autotuning one matmul's 21
# candidates took 33 s. AUTOTUNE_LIMIT (default 400 s) bounds each tuned run. About 25 s of
# install + 75 s + AUTOTUNE_LIMIT per model: one model a call. Carry .whl.
#   bash reports/bench/gpu/autotune_call.sh
#   MODELS="768x8 32" bash reports/bench/gpu/autotune_call.sh       # another model at its batch size
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt" || exit 1
IFS=, read -ra models <<< "${MODELS:-512x8 128}"
for model in "${models[@]}"; do
    set -- $model
    for compile in on max-autotune-no-cudagraphs; do
        limit=$([ "$compile" = on ] && echo 75 || echo "${AUTOTUNE_LIMIT:-400}")
        echo "## bench train --models $1 --batch-size $2 --compile $compile" | tee -a "$out/log.txt"
        timeout "$limit" tinyllm bench train --models "$1" --batch-size "$2" --seq-len 512 --dtype bfloat16 \
            --compile "$compile" --steps 60 --warmup 20 --name "autotune_$1_$compile" --out "$out/tables" 2>&1 \
            | grep -v -i warn | tail -3 | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
    done
done
# one archive: a call brings back only a few files
tar czf "$out/tables.tgz" -C "$out" tables && rm -r "$out/tables"
