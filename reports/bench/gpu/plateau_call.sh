#!/bin/bash
# One device call: the GPU preset's pretraining again and again, as given and with other params, to
# see when its validation loss leaves the plateau (about 0.70-0.75) that the preset's chat quality
# followed at lr 2e-3 (reports/gpu_speed.md, "The recipe as committed"). The data stages run once
# through DVC; then each run is `python -m stages.pretrain` on params.yaml with that run's flags (no
# compiling ahead), its validation losses to $OUT/plateau.log as it goes. Arguments: one run each,
# its flags in one word ("" for the preset as it is). No run starts after $UNTIL seconds (default
# 400) from the data stages' start; a run that fails, or whose flags name no param, says so and is
# skipped. Carry .whl.
#   bash reports/bench/gpu/plateau_call.sh "" "" "pretrain.lr=0.001" "pretrain.lr=0.001"
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
log=$out/plateau.log
BYTECODE=0 bash reports/bench/gpu/install.sh "$out" | tee -a "$log"
preset=$(tinyllm preset gpu) || { echo "no preset: see install.log" | tee -a "$log"; exit 1; }
SECONDS=0
dvc exp run $preset -S runtime.compile_ahead=false tokenize >> "$out/data.log" 2>&1 \
    || { echo "data stages failed: see data.log" | tee -a "$log"; exit 1; }
cp params.yaml "$out/preset_params.yaml"
echo "$SECONDS s: data stages done" | tee -a "$log"
for flags in "$@"; do
    (( SECONDS < ${UNTIL:-400} )) || { echo "$SECONDS s: no time left for [$flags]" | tee -a "$log"; break; }
    cp "$out/preset_params.yaml" params.yaml
    rm -f reports/metrics/pretrain.json  # so a failed run cannot report an earlier one's metrics
    python3 - "$flags" <<'PY' || { echo "$SECONDS s: bad flags [$flags]" | tee -a "$log"; continue; }
import sys, yaml
from tinyllm.config import parse_params
from tinyllm.presets import with_values

flags = dict(flag.split("=", 1) for flag in sys.argv[1].split())
params = with_values(yaml.safe_load(open("params.yaml")), {key: yaml.safe_load(text) for key, text in flags.items()})
parse_params(params, "flags")  # a flag that names no param stops here, by name; "1e-3" is read as a float there
yaml.safe_dump(params, open("params.yaml", "w"), allow_unicode=True, sort_keys=False)
PY
    echo "$SECONDS s: run [$flags]" | tee -a "$log"
    python3 -m stages.pretrain 2>&1 | grep --line-buffered "val \|first step done\|stopping\|keeping\|rror" \
        | tee -a "$log"
    (( PIPESTATUS[0] == 0 )) || { echo "$SECONDS s: run [$flags] failed" | tee -a "$log"; continue; }
    python3 -c "import json; m = json.load(open('reports/metrics/pretrain.json')); print('final', {k: m[k] for k in ('val/loss', 'tokens_per_sec', 'kept_step')})" \
        | tee -a "$log"
done
echo "$SECONDS s: done" | tee -a "$log"
