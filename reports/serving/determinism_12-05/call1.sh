#!/bin/bash
# Issue 20, 2026-12-05, H200 call 1 of 2 (log: call1_variants.log). Run from the repository root as
#   bash reports/serving/determinism_12-05/call1.sh   (with $OUT set, .whl and artifacts/grpo present)
# The batcher then ran its scheduler loop inside sdpa_kernel(every backend but cuDNN) always, with
# its usual decode buckets ("nocudnn"; `git apply reports/serving/determinism_12-05/nocudnn_scheduler.patch`);
# sitecustomize adds torch's deterministic mode (DET=1, warn_only) or one decode bucket (ONEBUCKET=1)
# inside the server's spawned engine process. The lora_step part is issue 22's.
cd "$(dirname "$0")/../../.."
(python3 -m pip install -q --no-index --find-links .whl dvc==3.67.1 dvclive==3.49.1 peft==0.21.2 deepspeed==0.19.8 gguf fastapi uvicorn openai && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .) >$OUT/install.log 2>&1
export PYTHONPATH=$PWD
mkdir -p /tmp/det && cat > /tmp/det/sitecustomize.py <<'PY'
import os
if os.environ.get("DET") == "1":
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
if os.environ.get("ONEBUCKET") == "1":
    import tinyllm.infer.batcher as b
    b._buckets = lambda most: [most]
PY
serve() {
    [ $SECONDS -gt 470 ] && { echo "## skipped $1 (time)" | tee -a $OUT/log.txt; return; }  # $1: label; rest: env
    local label=$1; shift
    echo "## serve: $label" | tee -a $OUT/log.txt
    env "$@" timeout 200 tinyllm bench serve artifacts/grpo --model 768x8 --device cuda --clients 1,8,32 --slots 32 \
        --requests 4 --max-tokens 256 --out $OUT/serve_$label 2>&1 | grep -v -i warn | tail -9 | tee -a $OUT/log.txt
}
replay() {
    echo "## replay: $*" | tee -a $OUT/log.txt
    (cd reports/bench/serving && timeout 120 python replay_check.py ../../../artifacts/grpo --model 768x8 --device cuda \
        --repeats 20 "$@" 2>&1 | grep -v -i warn | tail -5 | tee -a $OUT/log.txt)
}
serve nocudnn
replay --sdpa no-cudnn
serve torch_det DET=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=/tmp/det:$PWD
echo "## lora_step" | tee -a $OUT/log.txt
timeout 200 python reports/bench/gpu/lora_step.py --model 768x8 --device cuda --seq-len 512 --batch-size 32 --profile 2>&1 | grep -v -i warn | tee -a $OUT/lora_step.txt | tail -30
serve torch_det_onebucket DET=1 ONEBUCKET=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH=/tmp/det:$PWD
serve nocudnn_onebucket ONEBUCKET=1 PYTHONPATH=/tmp/det:$PWD
[ $SECONDS -lt 480 ] && replay --sdpa no-cudnn --inductor-deterministic
serve inductor_det TORCHINDUCTOR_DETERMINISTIC=1
