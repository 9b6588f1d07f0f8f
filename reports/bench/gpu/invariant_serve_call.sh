#!/bin/bash
# One device call for issue 20: `tinyllm bench serve` at 768x8 (random weights, bf16) with
# `--batch-invariant` (one decode shape over all slots, prompts prefilled alone), then as by
# default (a decode shape per batch-size bucket), then invariant again while time is left: the
# throughputs compare as ratios within the call, and the second invariant run says whether its
# equality holds twice. Arguments give another order: `... default invariant default` checks that
# neither server takes the other's compiled graphs from the compile cache (pytorch/pytorch#185449:
# before the fix of 2026-12-06 an invariant server after a default one was not invariant, and a
# default one after an invariant one was slow at 32 clients). This tree's runs of serve_ab_call.sh
# ("new" and "new+invariant"), no run starting after 380 s. (Until commit d865beb this script
# served a patched batcher instead, kernel settings with the buckets:
# reports/serving/invariant_kernels_h100/.)
# Carry .whl and artifacts/grpo (its tokenizer). About 25 s of install + 3 x 150 s at most.
#   bash reports/bench/gpu/invariant_serve_call.sh
# Runs so far: `default invariant default` (reports/serving/invariant_cache_fix/); with the
# invariant batcher's folded attention, the default order (reports/serving/grouped_rows_h100_2/);
# `invariant default` on an H200 (reports/serving/invariant_h200/).
order=("$@")
(( ${#order[@]} )) || order=(invariant default invariant)
runs=()
for server in "${order[@]}"; do
    case $server in invariant) runs+=(new+invariant) ;; default) runs+=(new) ;;
        *) echo "unknown server: $server (invariant or default)" >&2; exit 2 ;; esac
done
RUNS="${runs[*]}" UNTIL=380 exec bash "$(dirname "$0")/serve_ab_call.sh"
