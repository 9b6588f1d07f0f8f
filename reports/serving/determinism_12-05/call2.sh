#!/bin/bash
# Issue 20, 2026-12-05, H200 call 2 of 2 (log: call2_default_vs_onebucket_nocudnn.log): the server as
# on main, and with --deterministic (one decode shape over all slots + no cuDNN attention) from
# commit 6b0f288, reverted in a189c53 (`git show 6b0f288 | git apply` to rerun it).
cd "$(dirname "$0")/../../.."
(python3 -m pip install -q --no-index --find-links .whl dvc==3.67.1 dvclive==3.49.1 peft==0.21.2 deepspeed==0.19.8 gguf fastapi uvicorn openai && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .) >$OUT/install.log 2>&1
for flag in "" --deterministic "" --deterministic; do
    [ $SECONDS -gt 330 ] && break
    echo "## serve $flag" | tee -a $OUT/log.txt
    timeout 150 tinyllm bench serve artifacts/grpo --model 768x8 --device cuda --clients 1,8,32 --slots 32 --requests 4 \
        --max-tokens 256 --out $OUT/serve${flag}_$SECONDS $flag 2>&1 | grep -v -i warn | tail -8 | tee -a $OUT/log.txt
done
