#!/bin/bash
# After recipe_call.sh on the same machine (its artifacts, compile cache and params.yaml): does
# reading Dynamo's work from a package (reports/bench/gpu/dynamo_packages.patch, not in the code)
# shorten the first step of the stages given? The patch is applied, each stage's step compiled ahead
# as pretraining does it (writing the package beside Inductor's cache), then each stage runs alone
# four times, without its package (the folder moved aside), with it, with it, without, so that a
# drift of the machine shows. The "first step done" lines and exit codes go to $OUT/packages_ab.txt
# as they come; every log and each run's metrics to $OUT/packages_ab.tgz (one file: a call brings
# back only eight). The patch is taken out again at the end. About 4 x 22 s a stage on an H100.
#   bash reports/bench/gpu/packages_ab_call.sh lora grpo
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
logs=$(mktemp -d)
git apply reports/bench/gpu/dynamo_packages.patch || { echo "the patch does not apply" | tee -a "$out/packages_ab.txt"; exit 1; }
trap 'git apply -R reports/bench/gpu/dynamo_packages.patch; tar czf "$out/packages_ab.tgz" -C "$logs" .' EXIT
packages=$(python3 -c "from tinyllm.train.runtime import dynamo_packages; print(dynamo_packages('x').parent)")
[[ -n $packages && ! -e $packages.off ]] || { echo "no packages folder, or $packages.off left over" | tee -a "$out/packages_ab.txt"; exit 1; }
for stage in "$@"; do
    python3 -m stages.compile_ahead "$stage" > "$logs/ahead_$stage.log" 2>&1 &
done
for job in $(jobs -p); do
    wait "$job"; echo "compile ahead: exit $?" | tee -a "$out/packages_ab.txt"
done
ls "$packages" | tee -a "$out/packages_ab.txt"
run=0
first_step() {  # the stage alone; its start-up line, labelled, its exit code and its metrics kept
    run=$((run + 1))
    python3 -m "stages.$1" > "$logs/${1}_${run}_$2.log" 2>&1
    echo "$1 $2 (run $run): exit $?; $(grep -h "first step done" "$logs/${1}_${run}_$2.log" | sed 's/^.*first step done/first step done/')" \
        | tee -a "$out/packages_ab.txt"
    cp "reports/metrics/$1.json" "$logs/${1}_${run}_$2.json" 2>/dev/null
}
for stage in "$@"; do
    for with in no yes yes no; do
        if [[ $with == yes ]]; then
            first_step "$stage" with_package
        else
            mv "$packages" "$packages.off"
            first_step "$stage" without
            mv "$packages.off" "$packages"
        fi
    done
done
