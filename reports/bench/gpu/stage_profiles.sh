#!/bin/bash
# After a recipe call on the same warm machine (its artifacts and compile cache in place): where the
# stages' fixed costs go on the GPU machine's host. Each named stage runs again under cProfile (its
# outputs are rewritten with the same params; the compile cache is warm, as in the recipe after
# compiling ahead), and each stage module's imports are timed alone (-X importtime). Profiles in
# $OUT/profiles.tgz; read them with `python -m pstats`.
#   bash reports/bench/gpu/recipe_call.sh && bash reports/bench/gpu/stage_profiles.sh lora dpo export
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
