#!/bin/bash
# Which setting makes one H200 decode launch deterministic and batch-invariant? (issue 20;
# reports/serving.md, 2026-12-05.) replay_check.py once per setting, each in a fresh process (cuBLAS
# reads its workspace setting when CUDA starts), the most telling first. Run from the repository
# root; the log goes to $OUT/invariance.txt (or /tmp). On an H200 each run takes 15-105 s (the first
# compiles cold): about 6 minutes in all, so give it a device call of its own.
#   bash reports/bench/serving/invariance_runs.sh             (DEVICE=cpu to try it here)
set -o pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
log=${OUT:-/tmp}/invariance.txt
: > "$log"
for switches in "--sdpa no-cudnn" "" "--sdpa no-cudnn --cublas-workspace" "--sdpa no-cudnn --no-reduced-precision" \
                "--sdpa no-cudnn --inductor-deterministic" "--deterministic"; do
    echo "## ${switches:-default}" | tee -a "$log"
    (cd "$root/reports/bench/serving" && PYTHONPATH=$root timeout 110 python replay_check.py "$root/artifacts/grpo" \
        --model 768x8 --device "${DEVICE:-cuda}" --repeats 5 $switches 2>&1 | grep -v -i warn | tail -7 | tee -a "$log") \
        || echo "(exit $?: 124 is the time limit)" | tee -a "$log"
done
