#!/bin/bash
# After a recipe call on the same warm machine (its artifacts and compile cache in place): where the
# stages' fixed costs go on the GPU machine's host. Each named stage runs again under cProfile (its
# outputs are rewritten with the same params; the compile cache is warm, as in the recipe after
# compiling ahead), and each stage module's imports are timed alone (-X importtime). Profiles in
# $OUT/profiles.tgz; read them with `python -m pstats`.
#   bash reports/bench/gpu/recipe_call.sh && bash reports/bench/gpu/stage_profiles.sh lora dpo export
# Run so far: lora dpo export after the 230 s H100 recipe (imports and log in
# reports/bench/gpu/pipeline/eval_side_by_side_h100/profiles/; the .prof files were not kept: 4 MB).
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
mkdir -p "$out/profiles"
for stage in "$@"; do
    module=$stage; [[ $stage == tokenize ]] && module=tokenize_corpus
    python -X importtime -c "import stages.$module" 2> "$out/profiles/imports_$stage.txt"
    SECONDS=0
    python -m cProfile -o "$out/profiles/$stage.prof" -m "stages.$module" 2>&1 | grep -v "step [0-9]" \
        | tail -3 | tee -a "$out/profiles/log.txt"
    echo "$stage under cProfile: $SECONDS s" | tee -a "$out/profiles/log.txt"
done
tar czf "$out/profiles.tgz" -C "$out" profiles && rm -r "$out/profiles"
