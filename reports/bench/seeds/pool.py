"""Pool the runs of several seed sweeps into one comparison (issue 18: is a device's quality within
3 points of the CPU's?). Each group is a list of sources; a run is one (seed, metrics) of a source.

    cd reports/bench/seeds
    python pool.py cpu=cpu_bf16_seeds_1_2_lines_log.txt,cpu_bf16_seed_1337_lines_metrics.json#1337 \\
        h200=gpu/sweep15_log.txt,gpu/sweep16_log.txt

A source is a log of `run.py` (its lines `<settings> seed N: S s {metrics}`; `log@text` keeps the
lines whose settings contain `text`), a table `run.py` wrote for one variant (its per-seed columns),
or an eval `metrics.json` with its seed after `#`. The table gives each group's mean ± std (runs)
and the difference of each later group's mean from the first's (in points; pretraining's kept step
and best validation loss as they are).
"""

from __future__ import annotations

import ast
import json
import re
import statistics
import sys
from pathlib import Path

from run import METRICS, PRETRAIN, STAGES  # this folder's script, beside this one

LOG_LINE = re.compile(r"(?P<settings>.*) seed (?P<seed>\d+): \d+ s (?P<metrics>\{.*\})$")
SEED_COLUMN = re.compile(r"seed (?P<seed>\d+) \((?P<stage>\w+)\)")


def read_source(source: str) -> list[tuple[int, dict[str, float]]]:
    """(seed, {"<stage>.<metric>": value}) for every run in one source."""
    if "#" in source:
        path, seed = source.split("#")
        metrics = json.loads(Path(path).read_text())
        return [(int(seed), {f"{stage}.{key}": value for stage, values in metrics.items()
                             for key, value in values.items() if isinstance(value, int | float)})]
    path, _, keep = source.partition("@")
    text = Path(path).read_text()
    if path.endswith(".md"):
        return read_table(text)
    return [(int(m["seed"]), ast.literal_eval(m["metrics"])) for m in map(LOG_LINE.match, text.splitlines())
            if m and keep in m["settings"]]


def read_table(text: str) -> list[tuple[int, dict[str, float]]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    head, body = rows[0], rows[1:]
    runs: dict[int, dict[str, float]] = {}
    for col, name in enumerate(head):
        if match := SEED_COLUMN.fullmatch(name):
            runs.setdefault(int(match["seed"]), {}).update(
                {f"{match['stage']}.{row[0]}": float(row[col]) for row in body if row[col] != "–"})
    return list(runs.items())


def main() -> None:
    groups = {}
    for arg in sys.argv[1:]:
        name, _, sources = arg.partition("=")
        groups[name] = [run for source in sources.split(",") for run in read_source(source)]
    if not groups:
        sys.exit(__doc__)
    names = list(groups)
    print("| metric | " + " | ".join(f"{name}: seeds {', '.join(str(s) for s, _ in groups[name])}" for name in names)
          + "".join(f" | {name} − {names[0]}" for name in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for key in [f"pretrain.{k}" for k in PRETRAIN] + [f"{stage}.{m}" for stage in STAGES for m in METRICS]:
        values = {name: [run[key] for _, run in groups[name] if key in run] for name in names}
        if not all(values.values()):
            continue
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f} ({len(v)})"
                 for v in values.values()]
        first = statistics.mean(values[names[0]])
        as_is = key.startswith("pretrain.")  # a step or a loss as it is; a share in points
        cells += [f"{statistics.mean(values[name]) - first:+.3f}" if as_is
                  else f"{100 * (statistics.mean(values[name]) - first):+.1f}" for name in names[1:]]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
