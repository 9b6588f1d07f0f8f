"""Output folders written whole beside their place, then moved in: a failure midway leaves the
previous folder as it was, and a reader never sees half of one.

    with replaced_folder(out) as tmp:   # tmp: an empty <out>.tmp
        ... write every file into tmp ...
    # here tmp has become out
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from tinyllm.errors import UserError


@contextlib.contextmanager
def replaced_folder(out: Path) -> Iterator[Path]:
    """Yield an empty `<out>.tmp` to write into; when the block ends it replaces `out`, and when the
    block raises it is deleted and `out` is untouched.

    The old folder is renamed to `<out>.old` and deleted after the new one is in place, never
    deleted first or rewritten in place: `out` is missing only between two renames, and a process
    that has the old files memory-mapped (a training stage reading a chat set) is not left with
    truncated ones.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: not a folder (a file or a symbolic link); move it away or write elsewhere")
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    _remove(tmp)  # left by a write that was killed
    _remove(old)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
