"""Output folders written whole beside their place, then moved in: a failure midway leaves the
previous folder untouched, and a reader never sees half of one.

    tmp = scratch_folder(out)        # an empty out.tmp
    ... write every file into tmp ...
    move_into_place(tmp, out)
"""

from __future__ import annotations

import shutil
from pathlib import Path


def scratch_folder(out: Path) -> Path:
    """An empty `<out>.tmp` beside `out` to write into (what a failed write left there is cleared)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with `tmp`. The old folder is renamed to `<out>.old` before it is deleted, not
    rewritten or deleted in place: a process that has its files open or memory-mapped keeps reading
    them, and `out` is missing only between two renames."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
