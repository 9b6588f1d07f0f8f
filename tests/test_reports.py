"""Figures quoted in hand-written reports equal the metrics files they link to (tinyllm/eval/quotes.py)."""

import json
from pathlib import Path

import pytest

from tinyllm.eval.quotes import Quote, quotes, refresh

ROOT = Path(__file__).resolve().parents[1]
REPORTS = sorted([ROOT / "README.md", *(ROOT / "reports").rglob("*.md")])


def test_a_quote_is_written_the_way_its_text_is(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"sft": {"qa": 0.8277, "tokens": 1234567, "loss": 0.25}}))
    report = tmp_path / "r.md"
    report.write_text("QA [80.0%](m.json#sft.qa), [0.83](m.json#sft.qa), [1,234,567](m.json#sft.tokens), "
                      "loss [0.250](m.json#sft.loss), a plain [link](m.json#sft.qa).\n")
    found = quotes(report)
    assert [q.text for q in found] == ["80.0%", "0.83", "1,234,567", "0.250"]
    assert [q.current() for q in found] == ["82.8%", "0.83", "1,234,567", "0.250"]
    assert refresh(report) == 1
    assert report.read_text().startswith("QA [82.8%](m.json#sft.qa), [0.83](m.json#sft.qa)")
    with pytest.raises(KeyError, match="no sft.missing"):
        Quote("1.0", tmp_path / "m.json", "sft.missing").current()


def test_post_training_report_quotes_its_figures():
    assert len(quotes(ROOT / "reports/post_training.md")) >= 40


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_figure_matches_its_metrics_file(report):
    stale = [f"{q.file.relative_to(ROOT)}#{q.key}: report says {q.text}, file says {q.current()}"
             for q in quotes(report) if q.current() != q.text]
    assert not stale, f"{report.relative_to(ROOT)} quotes stale figures (python -m tinyllm.eval.quotes " \
                      f"{report.relative_to(ROOT)} rewrites them):\n  " + "\n  ".join(stale)
