"""Streaming JSON Lines I/O whose errors name the file and line.

Every data file a user brings (pretraining text, chat, preferences) is read here one line at a
time, so a corpus of many gigabytes never sits in memory, and a bad line is reported as
`path:line: reason` instead of a traceback. Example:

    reader = read_jsonl("data/my.jsonl", validate_pretrain, on_bad_line="skip")
    texts = [rec["text"] for rec in reader]
    print(reader.n_bad, "bad lines skipped")
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tinyllm.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["DataError", "JsonlReader", "read_jsonl", "validate_pretrain", "write_jsonl"]

LOGGED_BAD_LINES = 20
"""Bad lines logged per file (a broken multi-GB dump would otherwise flood the log); all are counted."""

Validator = Callable[[object], "str | None"]
"""Returns why a decoded line is unusable, or None when it is fine."""

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class JsonlReader:
    """The valid records of a JSON Lines file, read lazily; `n_bad` counts skipped lines.

    Iterating again rereads the file and restarts the count.
    """

    def __init__(self, path: str | Path, validate: Validator, on_bad_line: str = "error"):
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line={on_bad_line!r} must be 'error' or 'skip'")
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self.validate = validate
        self.on_bad_line = on_bad_line
        self.n_bad = 0
        self.lineno = 0
        """The line of the record last yielded (for `bad_line` on a problem found later)."""

    def __iter__(self) -> Iterator[dict]:
        self.n_bad = 0
        # Binary mode: one undecodable line is then one bad line, not a crash of the whole read.
        with self.path.open("rb") as f:
            for self.lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                obj, reason = _decode(raw, first_line=self.lineno == 1)
                if reason is None:
                    reason = self.validate(obj)
                if reason is None:
                    yield obj
                else:
                    self.bad_line(reason)

    def bad_line(self, reason: str) -> None:
        """Report the current line as unusable: raise (on_bad_line "error") or count, log and go on."""
        if self.on_bad_line == "error":
            raise DataError(f"{self.path}:{self.lineno}: {reason}")
        self.n_bad += 1
        if self.n_bad <= LOGGED_BAD_LINES:
            log.warning("%s:%d: %s (skipped)%s", self.path, self.lineno, reason,
                        "; further bad lines of this file are counted, not logged"
                        if self.n_bad == LOGGED_BAD_LINES else "")


def read_jsonl(path: str | Path, validate: Validator, on_bad_line: str = "error") -> JsonlReader:
    """Read a JSON Lines file lazily, checking every non-blank line.

    Args:
        path: The file; it must exist.
        validate: Called on each decoded line; returns an error message or None.
        on_bad_line: "error" raises at the first bad line; "skip" logs it, counts it in
            the reader's `n_bad` and goes on.

    Returns:
        An iterable of the valid records (dicts when `validate` demands objects).

    Raises:
        DataError: The file is missing, or (with "error") a line is not UTF-8, not JSON or
            rejected by `validate`; the message starts with `path:line:`.
    """
    return JsonlReader(path, validate, on_bad_line)


def _decode(raw: bytes, first_line: bool) -> tuple[object, str | None]:
    """(object, None) for a good line, (None, reason) for a bad one."""
    try:
        # A byte-order mark at the file start is common in files saved on Windows; accept it.
        text = raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); re-save the file as UTF-8"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"not valid JSON: {err.msg} (column {err.colno})"


def _json_type(obj) -> str:
    return _JSON_TYPES.get(type(obj), type(obj).__name__)


def validate_pretrain(obj) -> str | None:
    """Check one pretraining record: an object with a non-empty string "text".

    Args:
        obj: A decoded JSON line.

    Returns:
        Why the record is unusable, or None when it is fine.
    """
    if not isinstance(obj, dict):
        return f'expected an object like {{"text": "..."}}, got a JSON {_json_type(obj)}'
    if "text" not in obj:
        return 'missing "text" (each line must look like {"text": "..."})'
    text = obj["text"]
    if not isinstance(text, str):
        return f'"text" must be a string, got a JSON {_json_type(text)}'
    if not text.strip():
        return '"text" is empty'
    return None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records one per line, atomically: readers see the old file or the whole new one.

    Records may be a generator; if it raises, the temp file is removed and `path` is untouched.

    Args:
        path: Destination; its folder is created if needed.
        records: JSON-serializable objects. Non-ASCII text is written as is (UTF-8).

    Returns:
        The number of records written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
