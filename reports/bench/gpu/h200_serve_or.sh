#!/bin/bash
# One device call that makes the most of whichever card comes when an H200 is asked for: on an
# H200, issue 20's last run (`invariant_serve_call.sh`: the 32-client target with
# --batch-invariant); on any other card, the command given. Carry .whl and artifacts/grpo.
#   bash reports/bench/gpu/h200_serve_or.sh bash reports/bench/gpu/p512_rows_call.sh
#   LIMIT=420 bash reports/bench/gpu/h200_serve_or.sh bash reports/bench/gpu/recipe_call.sh grpo
cd "$(dirname "$0")/../../.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    exec bash reports/bench/gpu/invariant_serve_call.sh
fi
exec "$@"
