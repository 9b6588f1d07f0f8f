#!/bin/bash
# One device call for issue 20: `tinyllm bench serve` (768x8, random weights, bf16) from an older
# commit's tinyllm and from this tree, alternated on one machine (by default old, new, old, new),
# with `top` sampling which processes hold the CPUs if TOP is set. Arguments after the script go to
# every bench serve (e.g. --batch-invariant); RUNS="old new" runs each once, a run named
# "new+invariant" (or "old+invariant") adds --batch-invariant to that run alone, and no run starts
# after UNTIL seconds (470). Before the call, the older commit's package into an ignored folder:
#   rm -rf .old_serve && mkdir .old_serve && git archive COMMIT tinyllm | tar -x -C .old_serve
# (.old_serve is ignored by git; only "old" runs need it); carry .whl, artifacts/grpo and .old_serve. About
# 25 s of install + 4 x 60-110 s.
#   bash reports/bench/gpu/serve_ab_call.sh
# Runs so far: COMMIT 7432b50 with TOP=1 (reports/serving/regression_ab/); COMMIT d1908aa, before
# the batcher's overlap (reports/serving/overlap_ab/); COMMIT cecec42 with RUNS="new+invariant new
# old old+invariant", before the invariant batcher's folded attention (reports/serving/grouped_rows_ab/).
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
root=$PWD
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"
(lscpu | grep -E "Model name|^CPU\(s\)|Thread|MHz"; nproc) | tee -a "$out/log.txt"
serve() {
    local name=$1 tree=$2; shift 2  # python -m imports tinyllm from the folder it runs in
    cd "$tree"
    echo "## bench serve $*: $name, $(python -c 'import tinyllm; print(tinyllm.__file__)') (at $SECONDS s)" \
        | tee -a "$out/log.txt"
    local top_pid=
    if [[ -n $TOP ]]; then top -b -d 5 -w 200 > "$out/top_$name.txt" & top_pid=$!; fi
    timeout 150 python -m tinyllm.cli bench serve "$root/artifacts/grpo" --model 768x8 --device cuda \
        --clients 1,8,32 --slots 32 --requests 4 --max-tokens 256 --out "$out/serve_$name" "$@" 2>&1 \
        | grep -v -i warn | grep "^|\|^Greedy" | tee -a "$out/log.txt" || echo "(exit $?: 124 is the time limit)" \
        | tee -a "$out/log.txt"
    [[ -n $top_pid ]] && kill $top_pid
    cd "$root"
}
tag=$(echo "$*" | tr -cd 'a-z')  # the flags, in the output's names
for run in ${RUNS:-old new old new}; do  # a typo would time the wrong tree
    case $run in old|new|old+invariant|new+invariant) ;; *) echo "unknown run in RUNS: $run" >&2; exit 2;; esac
done
i=0
for run in ${RUNS:-old new old new}; do  # RUNS="old new": once each
    i=$((i + 1))
    if (( SECONDS > ${UNTIL:-470} )); then break; fi
    tree=${run%+invariant}; flags=(); name=$tree
    [[ $run == *+invariant ]] && flags=(--batch-invariant) && name=${tree}inv
    if [[ $tree == old ]]; then serve "$name${tag}_$i" .old_serve "$@" "${flags[@]}"
    else serve "$name${tag}_$i" . "$@" "${flags[@]}"; fi
done
# one archive: a call brings back only a few files
folders=$(cd "$out" && ls -d serve_* 2>/dev/null)  # none if every server failed
if [[ -n $folders ]]; then tar czf "$out/serve$tag.tgz" -C "$out" $folders && rm -r "$out"/serve_*/; fi
