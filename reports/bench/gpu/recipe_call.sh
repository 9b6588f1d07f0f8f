#!/bin/bash
# One device call: the README's GPU recipe as a new user runs it, `dvc exp run $(tinyllm preset gpu)`
# on a fresh machine (every stage from prepare, cold compile cache), for issue 22's "recipe <= 180 s"
# and each stage's start-up split (setup / device / resume / engine / first step), and eval's time
# by part. The log goes to $OUT/recipe.log as the run goes; metrics are copied at the end.
# Carry .whl (../shared/tools/gpu-wheelhouse .whl gguf).
#   bash reports/bench/gpu/recipe_call.sh
#   bash reports/bench/gpu/recipe_call.sh -S sft.lr=0.0005     # flags after the preset's (they win)
# A second call on the same warm machine is cold only with fresh compile caches and no run cache:
#   rm -rf .dvc/cache; TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) bash reports/bench/gpu/recipe_call.sh
# and after a call cut by its time limit, dvc's leftover stash stops the next one there ("Stash apply
# resulted in merge conflicts"): start it with `git reset -q --hard; git stash clear`. With
# TORCH_LOGS=recompiles,dynamo,inductor the first steps of pretrain, lora, dpo and grpo took 26-56 s
# against 18-38 s without (one H100, 2026-12-06), when every log line still forked `date`.
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/recipe.log"
preset=$(tinyllm preset gpu) || { echo "no preset: see install.log" | tee -a "$out/recipe.log"; exit 1; }
SECONDS=0  # the seconds since dvc exp run started, on every line (bash's clock: no fork a line)
TORCH_LOGS=${TORCH_LOGS-recompiles} timeout "${LIMIT:-540}" dvc exp run $preset "$@" 2>&1 \
    | while IFS= read -r line; do echo "$SECONDS $line"; done | tee -a "$out/recipe.log" | grep -v "step [0-9]"
rc=${PIPESTATUS[0]}
echo "wall $SECONDS s (dvc exp run's exit status $rc; 124 is the time limit)" | tee -a "$out/recipe.log"
# one archive: a call brings back only a few files
tar czf "$out/metrics.tgz" reports/metrics/*.json reports/eval/metrics.json reports/eval/report.md 2>/dev/null
grep -h "first step done\|scored artifacts\|compile ahead:" "$out/recipe.log"
