#!/bin/bash
# After recipe_call.sh on the same machine (its artifacts, compile cache and params.yaml): does
# reading Dynamo's work from a package (reports/bench/gpu/dynamo_packages.patch, not in the code)
# shorten the first step of the stages given? The patch is applied, each stage's step compiled ahead
# as pretraining does it (writing the package beside Inductor's cache), then each stage runs alone,
# with its package and without it (the folder moved aside), one after the other; the patch is taken
# out again at the end. The "first step done" lines go to $OUT/packages_ab.txt as they come.
#   bash reports/bench/gpu/packages_ab_call.sh lora dpo grpo
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
git apply reports/bench/gpu/dynamo_packages.patch || { echo "the patch does not apply"; exit 1; }
trap 'git apply -R reports/bench/gpu/dynamo_packages.patch' EXIT
packages=$(python3 -c "from tinyllm.train.runtime import dynamo_packages; print(dynamo_packages('x').parent)")
for stage in "$@"; do
    python3 -m stages.compile_ahead "$stage" > "$out/ahead_$stage.log" 2>&1 &
done
wait
ls "$packages" | tee -a "$out/packages_ab.txt"
first_step() {  # the stage alone; its start-up line, labelled
    python3 -m "stages.$1" 2>&1 | grep "first step done" | sed "s/^.*first step done/$1 $2: first step done/" \
        | tee -a "$out/packages_ab.txt"
}
for stage in "$@"; do
    first_step "$stage" "with its package"
    mv "$packages" "$packages.off"
    first_step "$stage" "without"
    mv "$packages.off" "$packages"
done
