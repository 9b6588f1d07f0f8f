#!/bin/bash
# After recipe_call.sh on the same machine (its artifacts, compile caches and params.yaml): the dpo
# stage alone, once for each pairs-a-step given (dpo.batch_size), the rest of the GPU preset
# unchanged; each run's steady tokens/s against the recipe's pretraining, in one table. The two
# sizes alternate so that a drift of the machine shows. Logs go to $OUT/dpo_logs.tgz (one file:
# a device call brings back only a few).
#   bash reports/bench/gpu/dpo_batch_call.sh 64 192 64 192
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
logs=$(mktemp -d)
echo "| pairs a step | tokens/s | of pretraining's | padding | start-up (s) | reference pass (s) | training (s) | recompiles |"
echo "|---|---|---|---|---|---|---|---|"
run=0
for pairs in "$@"; do
    run=$((run + 1))
    python3 - "$pairs" <<'EOF'
import sys

from dvc.utils.serialize import modify_yaml

from tinyllm.presets import PRESETS, with_values

with modify_yaml("params.yaml") as params:  # (comments kept)
    params.update(with_values(params, {**PRESETS["gpu"], "dpo.batch_size": int(sys.argv[1])}))
EOF
    [[ $? == 0 ]] || { echo "params.yaml not set for $pairs pairs: stopped"; exit 1; }
    python3 -m stages.dpo > "$logs/dpo_${pairs}_$run.log" 2>&1
    ok=$?
    tar czf "$out/dpo_logs.tgz" -C "$logs" .  # after every run, so a call cut short keeps the runs before
    [[ $ok == 0 ]] || { echo "dpo at $pairs pairs failed: see its log"; continue; }
    python3 - "$pairs" <<'EOF'
import json
import sys

dpo = json.load(open("reports/metrics/dpo.json"))
pretrain = json.load(open("reports/metrics/pretrain.json"))["tokens_per_sec"]
print(f"| {sys.argv[1]} | {dpo['tokens_per_sec']:,.0f} | {dpo['tokens_per_sec'] / pretrain:.0%} "
      f"| {dpo['padding_share']:.1%} | {dpo['startup_seconds']:.1f} | {dpo['reference_seconds']} "
      f"| {dpo['train_seconds']} | {dpo['recompiles']} |")
EOF
done
rm -rf "$logs"
