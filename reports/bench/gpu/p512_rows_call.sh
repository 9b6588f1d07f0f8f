#!/bin/bash
# One device call for issue 22's 512x8 target: the pretraining bench at 128 and 256 rows a step,
# alternated twice, each in a process of its own (the 256-row figure was last taken beside another
# job, reports/bench/NOTES.md). Tables in $OUT/tables.tgz. Carry .whl. ROWS, STEPS and WARMUP
# give other batches and lengths (an H200 reached 2.0M at 384 and 512 rows: p512_rows_h200/).
#   bash reports/bench/gpu/p512_rows_call.sh
#   ROWS="512 384 512 384" STEPS=80 WARMUP=15 bash reports/bench/gpu/p512_rows_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
for rows in ${ROWS:-128 256 128 256}; do
    echo "## 512x8, $rows rows of 512 (at $SECONDS s)" | tee -a "$out/log.txt"
    timeout 140 tinyllm bench train --models 512x8 --compile on --dtype bfloat16 --seq-len 512 --batch-size $rows \
        --steps "${STEPS:-40}" --warmup "${WARMUP:-10}" --name "p512_b${rows}_$SECONDS" --out "$out/tables" 2>&1 \
        | grep -v -i warn | tail -4 | tee -a "$out/log.txt"
done
tar czf "$out/tables.tgz" -C "$out" tables && rm -r "$out/tables"  # a call brings back 8 files at most
