"""Figures quoted in hand-written reports, kept equal to the metrics files they come from.

A report quotes a metric as a markdown link to its file, with the key path as the fragment:

    held-out QA after SFT: [81.7%](eval/metrics.json#sft.qa_heldout)

It reads as a number and links to where it comes from. The text's own form says how to show the
value: a trailing % means a share shown as a percentage, and the decimals shown are the decimals
compared. `tests/test_reports.py` fails on a quote that no longer matches its file; after a new
run, `python -m tinyllm.eval.quotes reports/*.md` rewrites every quote from the files.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

QUOTE = re.compile(r"\[(?P<text>-?[\d,]+(?:\.\d+)?%?)\]\((?P<file>[^)#\s]+\.json)#(?P<key>[\w.\-/]+)\)")


@dataclass
class Quote:
    text: str
    file: Path
    key: str

    def current(self) -> str:
        """The value now in the file, written the way `text` is written."""
        value = json.loads(self.file.read_text())
        for part in self.key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(f"{self.file} has no {self.key}")
            value = value[part]
        percent = self.text.endswith("%")
        digits = self.text.rstrip("%").replace(",", "")
        decimals = len(digits.partition(".")[2])
        spec = f"{',' if ',' in self.text else ''}.{decimals}f"
        return format(value * 100 if percent else value, spec) + ("%" if percent else "")


def quotes(report: Path) -> list[Quote]:
    """Every quoted figure in `report`; files are relative to the report's folder."""
    return [Quote(m["text"], report.parent / m["file"], m["key"])
            for m in QUOTE.finditer(report.read_text(encoding="utf-8"))]


def refresh(report: Path) -> int:
    """Rewrite every quote in `report` from its file; returns how many changed."""
    changed = 0

    def replace(match: re.Match) -> str:
        nonlocal changed
        new = Quote(match["text"], report.parent / match["file"], match["key"]).current()
        changed += new != match["text"]
        return f"[{new}]({match['file']}#{match['key']})"

    report.write_text(QUOTE.sub(replace, report.read_text(encoding="utf-8")), encoding="utf-8")
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {refresh(Path(name))} figure(s) updated")
