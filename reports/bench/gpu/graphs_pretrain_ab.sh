#!/bin/bash
# One device call for the question the eighth session left open (reports/gpu_speed.md, "CUDA
# graphs in the recipe"): does replaying pretraining's step as CUDA graphs change what it learns?
# Both recipes with graphs pretrained to validation losses of 0.598 and 0.542; the three without
# reached 0.465-0.498, each on a machine of its own. Here every run is on one machine: the preset's
# stages up to pretrain with graphs (`dvc exp run`, which also writes the preset into params.yaml),
# then pretrain alone three more times, graphs off, on, off. Each run's validation curve goes to
# $OUT/ab.log. Carry .whl. About 25 s of install, 30 s of data, 4 x 110 s of pretraining.
#   bash reports/bench/gpu/graphs_pretrain_ab.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/ab.log"
preset=$(tinyllm preset gpu) || { echo "no preset: see install.log" | tee -a "$out/ab.log"; exit 1; }
curve() {  # the validation points of a run's log, then its summary
    grep -oE "step [0-9]+/[0-9]+ \| loss [0-9.]+ .*\| val [0-9.]+|first step done.*" | sed 's/| lr.*tok\/s //' \
        | tee -a "$out/ab.log"
    python -c "import json; m = json.load(open('reports/metrics/pretrain.json')); \
print('val/loss', m['val/loss'], 'cuda_graphs', m['cuda_graphs'], 'tokens/s', round(m['tokens_per_sec']))" \
        | tee -a "$out/ab.log"
}
echo "## run 1: runtime.cuda_graphs=auto (dvc exp run, up to pretrain)" | tee -a "$out/ab.log"
timeout 200 dvc exp run $preset pretrain 2>&1 | curve
for graphs in false auto false; do
    echo "## runtime.cuda_graphs=$graphs (python -m stages.pretrain)" | tee -a "$out/ab.log"
    sed -i "s/^\(  cuda_graphs:\) [a-z]*/\1 $graphs/" params.yaml
    grep "^  cuda_graphs:" params.yaml | cut -c1-30 | tee -a "$out/ab.log"
    timeout 140 python -m stages.pretrain 2>&1 | curve
done
