#!/bin/bash
# One device call that makes the most of whichever card comes when an H200 is asked for:
# on an H200, issue 20's last run (`invariant_serve_call.sh`: the 32-client target with
# --batch-invariant); on any other card, issue 22's start-ups: the preset recipe from prepare to
# grpo, cold, whose "first step done" lines now split each stage's compiling (Dynamo's tracing,
# Inductor's forward and backward, the wait for kernel builds). Carry .whl and artifacts/grpo.
#   bash reports/bench/gpu/h200_serve_or_startup_call.sh
cd "$(dirname "$0")/../../.."
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    exec bash reports/bench/gpu/invariant_serve_call.sh
fi
LIMIT=${LIMIT:-420} exec bash reports/bench/gpu/recipe_call.sh grpo
