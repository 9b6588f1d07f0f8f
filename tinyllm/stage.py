"""Glue shared by the thin scripts in `stages/`: logging, params, and clean errors.

    @stage_main
    def main(params): ...

A user's mistake (bad params, malformed data, a missing input) ends the stage with one line
naming the file, line or param, and exit status 2 — not a traceback from deep inside a library.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from tinyllm.config import load_params
from tinyllm.errors import UserError

USER_ERRORS = (UserError, FileNotFoundError)


def write_json(path: Path, obj) -> None:
    """Write `obj` as JSON via a temp file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_skipped(stage: str, out: Path, reason: str, run) -> None:
    """A switched-off stage's outputs (rank 0): `out` holding only a DISABLED note (DVC needs every
    out to exist; eval and chat skip a folder without weights), a dvclive point and its metrics."""
    if not run.dist.is_main:
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "DISABLED").write_text(reason + "\n")
    run.logger.log(0, {"enabled": 0})
    write_json(Path("reports/metrics") / f"{stage}.json", {"enabled": False, "reason": reason})


def stage_main(fn=None, *, parses_arguments: bool = False):
    """Run `fn(params)` with params.yaml loaded; user errors exit 2 with a one-line message.
    A script that parses its own command line (compile_ahead) says so: `@stage_main(parses_arguments=True)`."""
    if fn is None:
        return functools.partial(stage_main, parses_arguments=parses_arguments)

    @functools.wraps(fn)
    def main() -> None:
        if not parses_arguments:
            check_arguments(sys.argv[1:], fn.__globals__.get("__doc__"))  # the stage module's docstring
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if "torch" in sys.modules:  # loaded by the stage's imports where it does tensor work (not the data stages)
            from tinyllm import cpu_threads

            cpu_threads.warm_up_math_kernels()  # before any tensor work: data, reference log-probs, the model
        try:
            fn(load_params("params.yaml"))
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        exit_without_teardown()

    return main


def check_arguments(args: list[str], doc: str | None) -> None:
    """A stage takes its settings from params.yaml only, so it refuses arguments rather than
    ignoring them: `python -m stages.sft --help` prints the stage's docstring instead of training
    and overwriting artifacts/sft. DeepSpeed's launcher adds `--local_rank=N` (the environment
    says the same), which is let through."""
    args = [arg for arg in args if not arg.startswith(("--local_rank=", "--local-rank="))]
    if not args:
        return
    if args[0] in ("-h", "--help"):
        print(f"{(doc or '').strip()}\n\nA stage takes no arguments: it reads params.yaml "
              "(`dvc exp run -S key=value`).")
        sys.exit(0)
    print(f"error: a stage takes no arguments, got {' '.join(args)!r}: set params in params.yaml "
          "or with `dvc exp run -S key=value`", file=sys.stderr)
    sys.exit(2)


def exit_without_teardown() -> None:
    """End a stage that finished well without the interpreter's teardown.

    By now the stage has written and closed everything it makes (checkpoints renamed into place,
    dvclive ended, the resume-point writer joined). A normal exit goes on to free every object one
    by one and run torch's C++ destructors: 1.1-1.6 s after a compiled stage on a 2-core CPU, while
    DVC waits to hash its outputs. This exit keeps what a normal one does before that, in the same
    order (the interpreter's own calls): threading's shutdown, which stops the thread pools and then
    waits for the threads that are not daemons (joining them before their pools are stopped waits
    forever: the compile workers' pool), and the atexit handlers (logging's flush); then it flushes
    the standard streams and leaves. The time that took is printed, so a pipeline's log splits the
    pause between a stage's "done" line and DVC's next one. One step is left out, the compile workers'
    shutdown: it sends their helper process a message and waits for it to stop them (1.06-1.3 s for two
    workers on a 2-core VM; the whole shutdown took 0.8-3.1 s after compiled stages on an H100).
    The helper reads a pipe from this process and stops its workers by itself once the pipe closes,
    which `os._exit` does, so DVC's next stage need not wait for it.
    """
    started = time.perf_counter()
    threading._shutdown()
    compile_workers = sys.modules.get("torch._inductor.async_compile")
    for pool in getattr(compile_workers, "_pool_set", ()):  # torch's pools of compile workers, if any started
        if hasattr(pool, "running"):  # a SubprocPool, whose shutdown does nothing when it is not running
            pool.running = False
    atexit._run_exitfuncs()
    if "torch" in sys.modules:  # the stages whose shutdown stops thread pools and compile workers
        print(f"the process's shutdown took {time.perf_counter() - started:.1f} s", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
