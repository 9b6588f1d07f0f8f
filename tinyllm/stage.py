"""Glue shared by the thin scripts in `stages/`: logging, params, and clean errors.

    @stage_main
    def main(params): ...

A user's mistake (bad params, malformed data, a missing input) ends the stage with one line
naming the file, line or param, and exit status 2 — not a traceback from deep inside a library.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
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


def stage_main(fn):
    """Run `fn(params)` with params.yaml loaded; user errors exit 2 with a one-line message."""

    @functools.wraps(fn)
    def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        try:
            fn(load_params("params.yaml"))
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return main
