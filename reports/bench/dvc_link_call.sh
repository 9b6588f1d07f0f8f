#!/bin/bash
# What DVC's cache link type costs at the end of a stage: a throwaway DVC repo whose one stage writes
# a file the size of the GPU preset's checkpoint (768x8 in float32: about 240 MB), run with
# `dvc repro --force` under each cache.type, alternating, several times. The stage's own command
# is timed apart, so the table's last column is DVC's own time: its start, reading the repo, hashing
# the output, moving it into the cache and linking it back (with `copy`: two copies), the lock.
# Prints a table; the filesystem first.
#   bash reports/bench/dvc_link_call.sh                 # 240 MB, 3 rounds, in a folder under .dvc/tmp
#   MB=100 ROUNDS=5 bash reports/bench/dvc_link_call.sh
set -eo pipefail
mb=${MB:-240}
rounds=${ROUNDS:-3}
mkdir -p .dvc/tmp
repo=$(mktemp -d "$PWD/.dvc/tmp/link_bench.XXXXXX")  # where the project's cache is; git ignores it
trap 'chmod -R u+w "$repo"; rm -rf "$repo"' EXIT
echo "filesystem: $(df -T "$repo" | awk 'NR == 2 {print $2}'), $mb MB a run, $rounds rounds"
cd "$repo"
git init -q && dvc init -q
cat > dvc.yaml <<YAML
stages:
  write:
    cmd: python3 -c "import os, time; t = time.time(); os.makedirs('out', exist_ok=True);
      open('out/model.bin', 'wb').write(os.urandom($mb << 20)); open('cmd_seconds', 'w').write(str(time.time() - t))"
    outs:
      - out
YAML
echo "| cache.type | dvc repro (s) | the stage's command (s) | DVC's own time (s) |"
echo "|---|---|---|---|"
for _ in $(seq "$rounds"); do
    for kind in copy hardlink; do
        dvc config cache.type "$kind"
        start=$(date +%s.%N)
        dvc repro --force -q > /dev/null
        end=$(date +%s.%N)
        cmd=$(cat cmd_seconds)
        python3 -c "w = $end - $start; print(f'| $kind | {w:.2f} | {$cmd:.2f} | {w - $cmd:.2f} |')"
        dvc gc -w -f -q > /dev/null  # keep the cache from growing: only the workspace's copy is kept
    done
done
