"""Pretraining's step compiled while the data stages run.

On a GPU, compiling pretraining's step from a cold cache took 22-25 s of the stage's 31-36 s
start-up on an H200 (reports/gpu_speed.md). What compiles depends on the model's shape and the
batch's, all of them params (the vocabulary too: the tokenizer is filled to `tokenizer.vocab_size`),
not on the tokens. So the first data stage that runs, prepare or train_tokenizer, starts a process
that trains pretraining for one step on random tokens (`python -m stages.compile_ahead pretrain`)
and fills the compile cache while the data is made. The pretrain stage waits for that process
before it compiles, then reads its graphs from the cache:

    pretrain_ahead.start_on_a_gpu()    # stages/prepare.py and stages/train_tokenizer.py, first thing
    pretrain_ahead.wait()              # stages/pretrain.py, before training

The process is found by a file holding its pid (FOLDER/pid), next to a digest of the params.yaml it
compiles for (FOLDER/params): a later data stage of the same run keeps it. It removes the pid file
when it ends; its output is FOLDER/log. This module imports no torch: the data stages never load it.
The process does load torch, and ends at once unless the params compile pretraining in one process
(`stages.compile_ahead.compiles_ahead`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
FOLDER = Path("checkpoints/pretrain_ahead")  # checkpoints/: a running stage's files, neither git's nor DVC's
PARAMS = Path("params.yaml")
COMPILED = "first step done"
"""In the process's log once it has compiled: the training loop's line after its first step."""
WAIT_SECONDS = 120.0
"""The longest pretraining waits, counted from when the process started (a cold compile took 22-25 s
on an H200); after it, pretraining compiles for itself."""


def start_on_a_gpu() -> None:
    """`start()` where an NVIDIA GPU is present (the driver's folder, looked up without torch). On a
    CPU the stages do not compile by default, and a process importing torch would only take a core
    from the data stages. (The process reads the other switches itself: `runtime.compile_ahead:
    false` or several processes end it at once. Reading them here would make them params of the
    data stages, which would then rerun when they change.) A failure to start it is logged; the
    stage's own work is done."""
    if Path("/proc/driver/nvidia/gpus").is_dir():
        try:
            start()
        except OSError as err:
            log.warning("compile ahead: pretraining's step could not be compiled ahead: %s", err)


def start() -> None:
    """Start the process that compiles pretraining's step, in a session of its own so that it
    outlives this stage, and write its pid where `wait` finds it; unless one for the same params.yaml
    runs or has compiled (an earlier data stage of this run started it). One for other params is
    stopped first: its graphs would not be this run's."""
    started, digest = _started(), _digest()
    if _kept_digest() == digest and ((started is not None and _running(started[0])) or COMPILED in _output()):
        return
    stop()
    FOLDER.mkdir(parents=True, exist_ok=True)
    (FOLDER / "params").write_text(digest)
    with open(FOLDER / "log", "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "stages.compile_ahead", "pretrain"],
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    (FOLDER / "pid").write_text(str(process.pid))


def finished() -> None:
    """Called by the process as it ends, however it ends: pretraining need not wait any more."""
    pid_file = FOLDER / "pid"
    if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
        pid_file.unlink(missing_ok=True)


def wait() -> float:
    """Wait until the process `start` began has ended, or WAIT_SECONDS have passed since the pid
    file's time, when the process started (then stop it: pretraining compiles for itself,
    and the process would only compete with it); return the seconds waited (0 where none was
    started, or it has ended). Logs the wait, and the end of the process's output where it did not
    compile the step. A process for these params that ended before counts the same; its files are
    removed, so the next run starts anew. One for other params (an earlier run's data stages started
    it, and its pretraining did not run) is stopped without a wait: its graphs are not this run's."""
    if _kept_digest() != _digest():
        stop()
        return 0.0
    started = _started()
    begun = time.monotonic()
    if started is not None:
        pid, since = started
        while _running(pid) and (FOLDER / "pid").exists() and time.time() - since < WAIT_SECONDS:
            time.sleep(0.05)
    stop()
    waited = time.monotonic() - begun
    output = _output()
    if COMPILED in output:
        log.info("compile ahead: waited %.1f s for pretraining's step compiled while the data was made (%s)",
                 waited, FOLDER / "log")
    else:
        log.warning("compile ahead: pretraining's step was not compiled ahead (waited %.1f s); the end of %s:\n  %s",
                    waited, FOLDER / "log", "\n  ".join(output.splitlines()[-5:]))
    return waited


def stop() -> None:
    """Stop the process `start` began, if it still runs (with the compile workers of its session),
    and remove its pid file and params digest: once pretraining has waited, the next run's data
    stages start a new one (its compile cache may be another)."""
    started = _started()
    if started is not None and _running(started[0]):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started[0], signal.SIGKILL)
    (FOLDER / "pid").unlink(missing_ok=True)
    (FOLDER / "params").unlink(missing_ok=True)


def _digest() -> str:
    """The params.yaml here, as `start` keeps it beside the pid."""
    return hashlib.sha256(PARAMS.read_bytes()).hexdigest()


def _kept_digest() -> str | None:
    """The digest of the params.yaml the process `start` began last compiles for (None: none)."""
    kept = FOLDER / "params"
    return kept.read_text() if kept.is_file() else None


def _output() -> str:
    """What the process has written so far ("" where none was started)."""
    return (FOLDER / "log").read_text(errors="replace") if (FOLDER / "log").is_file() else ""


def _started() -> tuple[int, float] | None:
    """The pid in the pid file and the file's time (when the process started), or None where there
    is none."""
    try:
        return int((FOLDER / "pid").read_text()), (FOLDER / "pid").stat().st_mtime
    except (FileNotFoundError, ValueError):
        return None


def _running(pid: int) -> bool:
    """Whether process `pid` runs and is the one `start` began: it exists, is not a zombie (an
    orphan ends up with the container's first process, which need not reap it) and runs
    stages.compile_ahead (a stale pid file may name a pid since given to another program)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"stages.compile_ahead" in command
