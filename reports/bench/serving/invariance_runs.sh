#!/bin/bash
# Which setting makes one H200 decode launch batch-invariant? (issue 20; reports/serving.md,
# 2026-12-05.) replay_check.py once per setting, each in a fresh process (cuBLAS reads its
# workspace setting when CUDA starts). Run from the repository root; logs to $OUT (or /tmp).
#   bash reports/bench/serving/invariance_runs.sh    (about 5 minutes on an H200; DEVICE=cpu to try it here)
cd "$(dirname "$0")/../../.." || exit 1
out=${OUT:-/tmp}/invariance.txt
for switches in "" "--sdpa no-cudnn" "--sdpa no-cudnn --cublas-workspace" "--sdpa no-cudnn --no-reduced-precision" \
                "--sdpa no-cudnn --inductor-deterministic" "--deterministic"; do
    echo "## $switches" | tee -a "$out"
    (cd reports/bench/serving && PYTHONPATH=$OLDPWD timeout 150 python replay_check.py ../../../artifacts/grpo \
        --model 768x8 --device "${DEVICE:-cuda}" --repeats 5 $switches 2>&1 | grep -v -i warn | tail -7 | tee -a "$out")
done
