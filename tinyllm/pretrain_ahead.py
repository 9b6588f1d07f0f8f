"""Pretraining's step compiled while the tokens are still being made.

On a GPU, compiling pretraining's step from a cold cache took 22-25 s of the stage's 31-36 s
start-up on an H200 (reports/gpu_speed.md). What compiles depends on the model's shape and the
batch's, not on the tokens. So the train_tokenizer stage starts a process that trains pretraining
for one step on random tokens of the vocabulary (`python -m stages.compile_ahead pretrain`). The
process imports torch while the tokenizer trains, waits for the vocabulary's size, which
train_tokenizer sends through a pipe once the tokenizer is saved (`vocabulary_from_starter`), and
fills the compile cache while encode_chats and tokenize run. The pretrain stage waits for that
process before it compiles, then reads its graphs from the cache:

    pretrain_ahead.start_on_a_gpu()    # stages/train_tokenizer.py, before training the tokenizer
    pretrain_ahead.tokenizer_saved(n)  # stages/train_tokenizer.py, after saving it
    pretrain_ahead.wait()              # stages/pretrain.py, before training

The process is found by a file holding its pid (FOLDER/pid). It removes that file when it ends;
its output is FOLDER/log. This module imports no torch: the data stages never load it. The process
does load torch, and ends at once unless the params compile pretraining in one process
(`stages.compile_ahead.compiles_ahead`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
FOLDER = Path("checkpoints/pretrain_ahead")  # checkpoints/: a running stage's files, neither git's nor DVC's
STARTER_FD = "TINYLLM_STARTER_FD"
"""The environment variable that gives the process its end of the pipe from the process that started it."""
WAIT_SECONDS = 120.0
"""The longest pretraining waits, counted from when the process began to compile, once the tokenizer
was saved (a cold compile took 22-25 s on an H200); after it, pretraining compiles for itself."""
_to_process: int | None = None
"""The writing end of the pipe to the process `start` began, until `tokenizer_saved` closes it."""


def start_on_a_gpu() -> None:
    """`start()` where an NVIDIA GPU is present (the driver's folder, looked up without torch). On a
    CPU the stages do not compile by default, and a process importing torch would only take a core
    from the data stages. (The process reads the other switches itself: `runtime.compile_ahead:
    false` or several processes end it at once. Reading them here would make them params of the
    train_tokenizer stage, which would then rerun when they change.) A failure to start it is
    logged; the stage's own work is done."""
    if Path("/proc/driver/nvidia/gpus").is_dir():
        try:
            start()
        except OSError as err:
            log.warning("compile ahead: pretraining's step could not be compiled ahead: %s", err)


def start() -> None:
    """Start the process that compiles pretraining's step, in a session of its own so that it
    outlives this stage, and write its pid where `wait` finds it (an earlier one still running is
    stopped first: its pid file is about to be replaced). The process waits for `tokenizer_saved`."""
    global _to_process
    stop()
    if _to_process is not None:
        os.close(_to_process)  # the earlier pipe, not left open; stop() has ended its process
    FOLDER.mkdir(parents=True, exist_ok=True)
    reading, _to_process = os.pipe()
    try:
        with open(FOLDER / "log", "wb") as output:
            process = subprocess.Popen([sys.executable, "-m", "stages.compile_ahead", "pretrain"],
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True, pass_fds=(reading,),
                                       env={**os.environ, STARTER_FD: str(reading)})
    finally:
        os.close(reading)
    (FOLDER / "pid").write_text(str(process.pid))


def tokenizer_saved(vocab_size: int) -> None:
    """Send the process `start` began the saved tokenizer's vocabulary size, all it needs of the
    tokenizer to compile (it reads none of its files until a checkpoint copies them, after the
    compile, so not while DVC moves them into its cache). Nothing where none was started, or where
    it has ended already (its params do not compile ahead, say): the pipe is broken then."""
    global _to_process
    if _to_process is not None:
        with contextlib.suppress(BrokenPipeError), os.fdopen(_to_process, "w") as pipe:
            pipe.write(f"{vocab_size}\n")
        _to_process = None


def vocabulary_from_starter() -> int | None:
    """In the process: the vocabulary size `tokenizer_saved` sends, waited for while the tokenizer
    trains; None where the starter exited without sending it (train_tokenizer failed: its end of the
    pipe closed with nothing written). The pid file's time becomes now, so that `wait`'s
    WAIT_SECONDS do not count the tokenizer's training (minutes on a big corpus)."""
    with os.fdopen(int(os.environ.pop(STARTER_FD)), "r") as pipe:
        sent = pipe.read()  # returns at the end of the file: once the starter's end is closed
    with contextlib.suppress(FileNotFoundError):  # (written by the starter right after it started this one)
        os.utime(FOLDER / "pid")
    return int(sent) if sent.strip() else None


def finished() -> None:
    """Called by the process as it ends, however it ends: pretraining need not wait any more."""
    pid_file = FOLDER / "pid"
    if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
        pid_file.unlink(missing_ok=True)


def wait() -> float:
    """Wait until the process `start` began has ended, or WAIT_SECONDS have passed since the pid
    file's time, when the process began to compile (then stop it: pretraining compiles for itself,
    and the process would only compete with it); return the seconds waited (0 where none was
    started, or it has ended). Logs the wait, and the end of the process's output where it did not
    compile the step."""
    started = _started()
    if started is None:
        return 0.0
    pid, since = started
    begun = time.monotonic()
    while _running(pid) and (FOLDER / "pid").exists() and time.time() - since < WAIT_SECONDS:
        time.sleep(0.05)
    stop()
    waited = time.monotonic() - begun
    output = (FOLDER / "log").read_text(errors="replace") if (FOLDER / "log").is_file() else ""
    if "first step done" in output:  # the training loop's line after its first step, so compiled
        log.info("compile ahead: waited %.1f s for pretraining's step compiled while the tokens were made (%s)",
                 waited, FOLDER / "log")
    else:
        log.warning("compile ahead: pretraining's step was not compiled ahead (waited %.1f s); the end of %s:\n  %s",
                    waited, FOLDER / "log", "\n  ".join(output.splitlines()[-5:]))
    return waited


def stop() -> None:
    """Stop the process `start` began, if it still runs (with the compile workers of its session),
    and remove its pid file."""
    started = _started()
    if started is not None and _running(started[0]):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started[0], signal.SIGKILL)
    (FOLDER / "pid").unlink(missing_ok=True)


def _started() -> tuple[int, float] | None:
    """The pid in the pid file and the file's time (when the process began to compile), or None
    where there is none."""
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
