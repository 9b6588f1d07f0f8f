#!/bin/bash
# The GPU machine has no network: install the carried wheels (.whl, built by
# ../shared/tools/gpu-wheelhouse .whl gguf) and this repository, logging to $1/install.log; then
# print the card (name, memory), for the call's log.
#   bash reports/bench/gpu/install.sh "$OUT"
cd "$(dirname "$0")/../../.."
(python3 -m pip install -q --no-index --find-links .whl dvc==3.67.1 dvclive==3.49.1 peft==0.21.2 deepspeed==0.19.8 \
    gguf fastapi uvicorn openai && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .) \
    > "$1/install.log" 2>&1 || { echo "install failed: see install.log"; exit 1; }
# The machine sets PYTHONDONTWRITEBYTECODE=1 and its preinstalled packages have no bytecode, so
# every process compiled its imports from source (2.2-2.5x slower imports; reports/gpu_speed.md,
# "Bytecode written once"). Write it once, as a pip install would: 7 s. BYTECODE=0 skips it.
if [[ ${BYTECODE:-1} != 0 ]]; then
    SECONDS=0
    python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        tinyllm stages >> "$1/install.log" 2>&1
    echo "bytecode written: exit $?, $SECONDS s"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
