"""Eval's rows a chunk on a GPU: one checkpoint scored with its replies decoded 64 at a time and
320 at a time (`tinyllm.eval.metrics.STATIC_GENERATION_ROWS`), alternated on the same card after
one warm-up each, with each part's seconds and the metrics that differ. Run after the pipeline
(the workspace's params.yaml and artifacts), as `recipe_call.sh`'s follow-up:

    python reports/bench/gpu/eval_rows.py artifacts/sft [64,320]
"""

import logging
import sys
import time
from pathlib import Path

import torch

from tinyllm.config import load_params
from tinyllm.eval import metrics as eval_metrics
from tinyllm.eval import report


def scored(params, checkpoint: Path, rows: int) -> tuple[float, dict, dict]:
    """(wall seconds, the parts' seconds, flat metrics) of one checkpoint scored at `rows`."""
    eval_metrics.STATIC_GENERATION_ROWS = rows
    parts = {}
    stopwatch = report.Stopwatch

    class Recorded(stopwatch):  # keep the parts' seconds that evaluate_checkpoint logs
        def __init__(self):
            super().__init__()
            parts.update(seconds=self.seconds)

    report.Stopwatch = Recorded
    try:
        start = time.perf_counter()
        metrics, _ = report.evaluate_checkpoint(params, checkpoint, Path("artifacts/tokens"), Path("artifacts/data"))
        return time.perf_counter() - start, dict(parts["seconds"]), metrics
    finally:
        report.Stopwatch = stopwatch


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    checkpoint = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/sft")
    settings = [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "64,320").split(",")]
    params = load_params("params.yaml")
    runs = {rows: scored(params, checkpoint, rows) for rows in settings}  # warm-up: each shape compiles here
    runs = {rows: scored(params, checkpoint, rows) for rows in settings}
    names = list(next(iter(runs.values()))[1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (rows apply on a GPU only)"
    print(f"{device}, {checkpoint}, second run of each (the first compiled its shape)\n")
    print("| rows a chunk | whole (s) | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for rows, (wall, parts, _) in runs.items():
        print(f"| {rows} | {wall:.2f} | " + " | ".join(f"{parts.get(n, 0):.2f}" for n in names) + " |")
    base, *others = settings
    for rows in others:
        differ = {k: (v, runs[rows][2].get(k)) for k, v in runs[base][2].items()
                  if isinstance(v, float) and v != runs[rows][2].get(k)}
        print(f"\nmetrics that differ between {base} and {rows} rows: "
              + (", ".join(f"{k} {a:.4f} vs {b:.4f}" for k, (a, b) in sorted(differ.items())) or "none"))


if __name__ == "__main__":
    main()
