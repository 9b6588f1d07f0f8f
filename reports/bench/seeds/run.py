"""Run-to-run spread of the default pipeline: the same params over several seeds → reports/seeds.md.

    python reports/bench/seeds/run.py --seeds 1337,1,2      # ~9 min per seed on 2 CPU cores

Each seed is a `dvc exp run -S seed=N` in the workspace (everything reruns: the world, the
tokenizer, every stage); its reports/eval/metrics.json is read, then the workspace goes back to
the committed run (`git checkout` + `dvc checkout`). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
METRICS = ("qa_seen", "qa_heldout", "qa_heldout_zh", "qa_heldout_en", "multi_turn", "identity", "facts",
           "heldout_loss", "preference", "pref_margin", "bench_world", "unknown_abstain", "known_false_abstain")
STAGES = ("sft", "dpo")


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def run_seed(seed: int) -> dict:
    start = time.perf_counter()
    sh(sys.executable, "-m", "dvc", "exp", "run", "-S", f"seed={seed}")
    metrics = json.loads((ROOT / "reports/eval/metrics.json").read_text())
    print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        runs = {seed: run_seed(seed) for seed in seeds}
    finally:
        sh("git", "checkout", "--", "params.yaml", "dvc.lock", "reports")
        sh(sys.executable, "-m", "dvc", "checkout", "-f")
    lines = ["# The default pipeline over several seeds", "",
             (f"{platform.machine()}, {time.strftime('%Y-%m-%d')}, commit "
             f"{sh('git', 'rev-parse', '--short', 'HEAD').strip()}; seeds {', '.join(map(str, seeds))}. "
             "Command: `python reports/bench/seeds/run.py`."), "",
             "| metric | " + " | ".join(f"{s} mean ± std" for s in STAGES) + " | "
             + " | ".join(f"seed {seed} ({s})" for seed in seeds for s in STAGES) + " |",
             "|---|" + "---|" * (len(STAGES) * (1 + len(seeds)))]
    for key in METRICS:
        cells = []
        for stage in STAGES:
            values = [runs[seed][stage].get(key) for seed in seeds]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else "–")
        cells += [f"{runs[seed][stage][key]:.3f}" if key in runs[seed][stage] else "–" for seed in seeds
                  for stage in STAGES]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out = ROOT / "reports/seeds.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
