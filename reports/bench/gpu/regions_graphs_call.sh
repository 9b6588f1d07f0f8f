#!/bin/bash
# One device call for issue 22's next lead (reports/gpu_speed.md, "What is left"): compiling one
# decoder layer for all of them (plus the head with its loss) gives Inductor a smaller graph,
# which cut cold first steps by 5-10 s, but its steps lost to the host's work between the
# regions, DPO's short step most. Do CUDA-graph replays of every region win that back? Whole
# model against regions, each without and with graphs, cold (a fresh process and Inductor cache
# per row), at pretraining's and SFT's 32 x 512 and at a short step of 8 x 512. Carry .whl.
#   bash reports/bench/gpu/regions_graphs_call.sh
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/regions.txt"
for rows in 32 8; do
    for graphs in "" --cuda-graphs; do
        timeout 200 python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 \
            --batch-size $rows --steps 30 --scopes whole,regional $graphs 2>&1 | grep "^|" | tee -a "$out/regions.txt"
    done
done
