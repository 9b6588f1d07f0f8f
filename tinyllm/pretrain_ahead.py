"""Pretraining's step compiled while the tokens are still being made.

On a GPU, compiling pretraining's step from a cold cache took 22-25 s of the stage's 31-36 s
start-up on an H200 (reports/gpu_speed.md). What compiles depends on the model's shape and the
batch's, not on the tokens. So the train_tokenizer stage, once the vocabulary is known, starts a
process that trains pretraining for one step on random tokens (`python -m stages.compile_ahead
pretrain`). It fills the compile cache on disk while encode_chats and tokenize run. The pretrain
stage waits for that process before it compiles, then reads its graphs from the cache:

    pretrain_ahead.start_on_a_gpu()    # stages/train_tokenizer.py, after the tokenizer is saved
    pretrain_ahead.wait()              # stages/pretrain.py, before training

The process is found by a file holding its pid (FOLDER/pid). It removes that file when it ends;
its output is FOLDER/log. This module imports no torch: the data stages never load it. The process
does load torch, and ends at once unless the params compile pretraining in one process
(`stages.compile_ahead.compiles_ahead`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
FOLDER = Path("checkpoints/pretrain_ahead")  # checkpoints/: a running stage's files, neither git's nor DVC's
WAIT_SECONDS = 120.0
"""The longest pretraining waits, counted from the process's start (a cold compile took 22-25 s on an
H200); after it, pretraining compiles for itself."""


def start_on_a_gpu() -> None:
    """`start()` where an NVIDIA GPU is present (the driver's folder, looked up without torch). On a
    CPU the stages do not compile by default, and a process importing torch would only take a core
    from the data stages."""
    if Path("/proc/driver/nvidia/gpus").is_dir():
        start()


def start() -> None:
    """Start the process that compiles pretraining's step, in a session of its own so that it
    outlives this stage, and write its pid where `wait` finds it."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / "log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "stages.compile_ahead", "pretrain"], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (FOLDER / "pid").write_text(str(process.pid))


def finished() -> None:
    """Called by the process as it ends, however it ends: pretraining need not wait any more."""
    pid_file = FOLDER / "pid"
    if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
        pid_file.unlink(missing_ok=True)


def wait() -> float:
    """Wait until the process `start` began has ended, or WAIT_SECONDS have passed since it began;
    return the seconds waited (0 where none was started, or it has ended)."""
    pid_file = FOLDER / "pid"
    try:
        pid, started = int(pid_file.read_text()), pid_file.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return 0.0
    begun = time.monotonic()
    while pid_file.exists() and _running(pid) and time.time() - started < WAIT_SECONDS:
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    waited = time.monotonic() - begun
    log.info("compile ahead: waited %.1f s for pretraining's step compiled while the tokens were made (%s)",
             waited, FOLDER / "log")
    return waited


def _running(pid: int) -> bool:
    """Whether process `pid` runs: it exists and is not a zombie (an orphan ends up with the
    container's first process, which need not reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
