#!/bin/bash
# One device call (issue 22): the training loop with and without CUDA graphs (`runtime.cuda_graphs`),
# LoRA and full fine-tuning at 768x8, 32 rows of 512, each run a fresh process with an empty compile
# cache (graphs_fit.py), without graphs first in each pair. Carry .whl.
#   bash reports/bench/gpu/graphs_call.sh
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" || exit 1
echo "| training | cuda_graphs | tokens/s (steady) | recompiles | first step (s) | loss of each log window | card |" | tee -a "$out/graphs_fit.txt"
echo "|---|---|---|---|---|---|---|" | tee -a "$out/graphs_fit.txt"
for kind in lora full; do
    for graphs in false auto; do
        TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 110 python reports/bench/gpu/graphs_fit.py --kind $kind \
            --graphs $graphs > "$out/${kind}_$graphs.log" 2>&1 || echo "($kind $graphs: exit $?)" | tee -a "$out/graphs_fit.txt"
        grep "^| " "$out/${kind}_$graphs.log" | tee -a "$out/graphs_fit.txt"
    done
done
tail -5 "$out"/*_auto.log
# 512x8 at 128 rows (issue 22's pretraining bench), the same way:
#   python reports/bench/gpu/graphs_fit.py --kind full --preset 512x8 --rows 128 --vocab-size 6400 --graphs false|auto
