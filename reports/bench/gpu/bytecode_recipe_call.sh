#!/bin/bash
# One device call for issue 22: does the GPU machine's Python compile its libraries from source in
# every process? Profiles of lora, dpo and export there (stage_profiles.sh, 2026-12-06) spent
# 4.2-5.7 s each in `compile` on 1,700-4,000 modules per process: no bytecode (.pyc) beside the
# preinstalled packages, and none written. A pip install writes it; this call writes it once, as
# pip would have (`python -m compileall`), and times, on the same machine:
#   1. importing the stages' modules before and after (each in a fresh process);
#   2. the README's GPU recipe after it, cold (recipe_call.sh; arguments go to its dvc exp run:
#      `... bytecode_recipe_call.sh tokenize` runs the data stages alone).
# Carry .whl.   bash reports/bench/gpu/bytecode_recipe_call.sh
# Run so far: with `tokenize` on an H100, then the whole recipe alone on the same machine
# (reports/bench/gpu/pipeline/bytecode_h100/). Since then install.sh writes the bytecode itself (BYTECODE=0 here).
set -o pipefail
cd "$(dirname "$0")/../../.."
out=${OUT:-/tmp}
BYTECODE=0 bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"  # the bytecode comes below
python - <<'EOF' 2>&1 | tee -a "$out/log.txt"
import os, sys, sysconfig, torch
site = sysconfig.get_paths()["purelib"]
cache = os.path.join(os.path.dirname(torch.__file__), "__pycache__")
print(f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE')!r} dont_write_bytecode={sys.dont_write_bytecode} "
      f"pycache_prefix={sys.pycache_prefix!r} site={site} writable={os.access(site, os.W_OK)} "
      f"torch/__pycache__ exists={os.path.isdir(cache)}")
EOF
imports() {
    for module in stages.sft stages.lora stages.export; do
        python -c "import time; t = time.perf_counter(); import $module; print(f'import $module: {time.perf_counter() - t:.1f} s')" \
            2>&1 | grep "^import" | tee -a "$out/log.txt"
    done
}
echo "## imports before compileall" | tee -a "$out/log.txt"; imports
bash reports/bench/gpu/install.sh "$out" | tee -a "$out/log.txt"  # again, now writing the bytecode (its time logged)
echo "## imports after compileall" | tee -a "$out/log.txt"; imports
LIMIT=${LIMIT:-260} OUT=$out bash reports/bench/gpu/recipe_call.sh "$@" > /dev/null
grep -h "^wall\|Running stage\|first step done\|scored artifacts" "$out/recipe.log" | sed -E 's/(after the process started).*/\1/' \
    | tee -a "$out/log.txt"
