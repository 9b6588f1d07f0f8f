#!/bin/bash
# One device call for the question the eighth session left open (reports/gpu_speed.md, "CUDA
# graphs in the recipe"): does replaying pretraining's step as CUDA graphs change what it computes?
# Both recipes with graphs pretrained to validation losses of 0.598 and 0.542; the three without
# reached 0.465-0.498, each on a machine of its own, and runs of one setting differ from step 20 on
# (nondeterministic kernels), so a few runs cannot settle it. Here pretraining runs with torch's
# deterministic algorithms: twice without graphs (which should agree with each other to the last
# digit), then once with them (which should agree too, if a replay computes what the step does).
# The preset's data first (`dvc exp run ... tokenize`, which also writes the preset into
# params.yaml), then pretrain alone three times; each run's loss and validation curve goes to
# $OUT/ab.log. Carry .whl. About 25 s of install, 30 s of data, 3 x 120 s of pretraining.
#   bash reports/bench/gpu/graphs_pretrain_ab.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/ab.log"
preset=$(tinyllm preset gpu) || { echo "no preset: see install.log" | tee -a "$out/ab.log"; exit 1; }
timeout 120 dvc exp run $preset tokenize 2>&1 | tail -3 | tee -a "$out/ab.log"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # cuBLAS's part of deterministic algorithms
for graphs in false false auto; do
    echo "## runtime.cuda_graphs=$graphs, deterministic algorithms" | tee -a "$out/ab.log"
    sed -i "s/^\(  cuda_graphs:\) [a-z]*/\1 $graphs/" params.yaml
    timeout 170 python -c "import runpy, torch; torch.use_deterministic_algorithms(True, warn_only=True); \
runpy.run_module('stages.pretrain', run_name='__main__')" 2>&1 \
        | grep -oE "step [0-9]+/[0-9]+ \| loss [0-9.]+.*|first step done.*" | sed 's/| lr [^|]*| [^|]*tok\/s//' \
        | tee -a "$out/ab.log"
    python -c "import json; m = json.load(open('reports/metrics/pretrain.json')); \
print('val/loss', m['val/loss'], 'cuda_graphs', m['cuda_graphs'], 'tokens/s', round(m['tokens_per_sec']))" \
        | tee -a "$out/ab.log"
done
