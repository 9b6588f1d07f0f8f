#!/bin/bash
# One device call: do nested layer regions (regions.py) cost the LoRA and DPO steps
# anything on the GPU? The same step benches with and without them, each in a fresh process with
# an empty compile cache, on one machine. Carry .whl, artifacts/data/dpo.jsonl and artifacts/sft
# (the CPU pipeline's pairs and tokenizer).
#   bash reports/bench/gpu/regions_ab_call.sh
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out"
for regions in --regions ""; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python reports/bench/gpu/dpo_step.py --model 768x8 --pairs 64 \
        --objectives "dpo,causal rows" $regions 2>&1 | tee -a "$out/regions_ab.txt"
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python reports/bench/gpu/lora_step.py --model 768x8 --vocab 2048 \
        --kinds full,lora $regions 2>&1 | tee -a "$out/regions_ab.txt"
done
