#!/bin/bash
# One device call for issue 20: `tinyllm bench serve` at 768x8 (random weights, bf16) with
# `--batch-invariant` (one decode shape over all slots, prompts prefilled alone), then as by
# default (a decode shape per batch-size bucket), then invariant again while time is left: the
# throughputs compare as ratios within the call, and the second invariant run says whether its
# equality holds twice. Arguments give another order: `... default invariant default` checks that
# neither server takes the other's compiled graphs from the compile cache (pytorch/pytorch#185449:
# before the fix of 2026-12-06 an invariant server after a default one was not invariant, and a
# default one after an invariant one was slow at 32 clients). (Until commit d865beb this script
# served a patched batcher instead, kernel settings with the buckets:
# reports/serving/invariant_kernels_h100/.)
# Carry .whl and artifacts/grpo (its tokenizer). About 25 s of install + 3 x 150 s at most.
#   bash reports/bench/gpu/invariant_serve_call.sh
# Runs so far: `default invariant default` (reports/serving/invariant_cache_fix/); with the
# invariant batcher's folded attention, the default order (reports/serving/grouped_rows_h100_2/).
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
serve() {
    local name=$1; shift
    echo "## bench serve: $name (at $SECONDS s)" | tee -a "$out/log.txt"
    timeout 170 tinyllm bench serve artifacts/grpo --model 768x8 --device cuda --clients 1,8,32 --slots 32 --requests 4 \
        --max-tokens 256 --out "$out/serve_$name" "$@" 2>&1 | grep -v -i warn | tail -12 | tee -a "$out/log.txt" \
        || echo "(exit $?: 124 is the time limit)" | tee -a "$out/log.txt"
}
order=("$@")
(( ${#order[@]} )) || order=(invariant default invariant)
i=0
for server in "${order[@]}"; do
    i=$((i + 1))
    if (( SECONDS > 380 )); then break; fi
    if [[ $server == invariant ]]; then serve "${i}_invariant" --batch-invariant; else serve "${i}_default"; fi
done
folders=$(cd "$out" && ls -d serve_* 2>/dev/null)  # none if every server failed
if [[ -n $folders ]]; then tar czf "$out/serve.tgz" -C "$out" $folders && rm -r "$out"/serve_*/; fi
