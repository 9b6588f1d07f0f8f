#!/bin/bash
# One device call for issue 22: GRPO's step at one shape against rollouts of changing shapes
# (grpo_shapes.py, through run_grpo, each in a fresh process and compile cache). The regions bench
# is its own call (regions_graphs_call.sh). Carry .whl, artifacts/grpo (the tokenizer) and
# artifacts/data/grpo.jsonl (the prompts).
#   bash reports/bench/gpu/grpo_shapes_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/grpo_shapes.txt"
echo "| grpo | cuda_graphs | start-up (s) | compiling (s) | first step (s) | tokens/s | padding | recompiles | rollout tokens/s | stage (s) | card |" | tee -a "$out/grpo_shapes.txt"
echo "|---|---|---|---|---|---|---|---|---|---|---|" | tee -a "$out/grpo_shapes.txt"
for graphs in false auto; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 150 python reports/bench/gpu/grpo_shapes.py --graphs $graphs \
        > "$out/grpo_$graphs.log" 2>&1
    grep "^|" "$out/grpo_$graphs.log" | tee -a "$out/grpo_shapes.txt" || tail -5 "$out/grpo_$graphs.log"
done
