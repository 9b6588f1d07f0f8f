"""Run-to-run spread of the default pipeline: the same params over several seeds → a markdown table.

    python reports/bench/seeds/run.py --seeds 1337,1,2      # ~10 min per seed on 2 CPU cores
    python reports/bench/seeds/run.py --jobs 9 --variant base: \\
        --variant bios12:data.world.bios_per_person=12 --out reports/bench/seeds/sweep.md   # a GPU box

Each run is a `dvc exp run -S seed=N [-S key=value ...] eval` of the pipeline (the world, the
tokenizer, every stage up to eval; not export) in its own copy of the workspace (git's files,
uncommitted ones too, and no DVC cache) under a temporary folder, and its reports/eval/metrics.json
is read; this workspace is never touched. A run that fails is reported and left out of the table.
`--jobs N` runs N at once: on a GPU box, or on a CPU box with the cores for it. Each CPU run takes
`runtime.threads: auto` (every core), so on the 2-core VM two at once took 10× longer than one
after the other (reports/quality.md, "Keeping the pretraining step…"); giving each run fewer
threads (`-S runtime.threads=1`) trains other weights than the default's. A variant is
`name:key=value,key=value` (the params every seed of it runs with; `name:` alone is the committed
params). Not part of CI.

With `--paired` every seed runs the whole pipeline once, with the first variant;
each other variant starts from a copy of that run and reruns only `prepare` and the stages from
`sft` on. Variants that change the chat data then share the seed's tokenizer and pretraining. A
full run cannot compare them fairly: the tokenizer reads the chat data, so any change to it
reorders the token ids, and pretraining becomes another draw (reports/grpo.md, "Counting walks").
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
METRICS = ("qa_seen", "qa_heldout", "qa_heldout_zh", "qa_heldout_en", "multi_turn", "identity", "facts",
           "heldout_loss", "preference", "pref_margin", "bench_world", "unknown_abstain", "known_false_abstain",
           "arith_heldout", "arith_pass8")
STAGES = ("sft", "dpo", "grpo")
PRETRAIN = ("kept_step", "val/best_loss")
"""From pretraining's summary: which step `keep: best` kept decides much of what the chat stages know
(reports/quality.md, "Which pretraining step knows the most"), so every run's log line names it."""


def sh(*cmd: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} in {cwd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def copy_workspace(dest: Path) -> Path:
    """git's files of this workspace (tracked and untracked, not ignored) and .git, into dest."""
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / ".git", dest / ".git")
    return dest


def set_flags(seed: int, settings: list[str]) -> list[str]:
    return [arg for s in [f"seed={seed}", *settings] for arg in ("-S", s)]


def run_one(seed: int, settings: list[str], workdir: Path, command: tuple[str, ...] = ()) -> dict:
    """`dvc exp run` of the pipeline up to `eval` with these settings (or the dvc `command` given) →
    its metrics. (`export` is left out: the table does not need it, and a GPU box without the
    `gguf` wheel failed there after every other stage had run.)"""
    start = time.perf_counter()
    sh(sys.executable, "-m", "dvc", *(command or ("exp", "run", *set_flags(seed, settings), "eval")), cwd=workdir)
    metrics = json.loads((workdir / "reports/eval/metrics.json").read_text())
    summary_file = workdir / "reports/metrics/pretrain.json"
    pretrain = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    metrics.setdefault("pretrain", {}).update({key: pretrain[key] for key in PRETRAIN if key in pretrain})
    summary = {f"{stage}.{key}": round(value, 3) for stage in ("pretrain", "sft", "lora", "dpo", "grpo")
               for key, value in metrics.get(stage, {}).items() if key in METRICS + PRETRAIN}
    seconds = time.perf_counter() - start
    print(f"{' '.join(settings) or 'committed params'} seed {seed}: {seconds:.0f} s {summary}", flush=True)
    return metrics


PRETRAINING_DATA = ("artifacts/data/pretrain.jsonl", "artifacts/data/world.json")


def run_chat_stages(seed: int, settings: list[str], base: Path, workdir: Path) -> dict:
    """The run in `base` (a whole pipeline of this seed), redone from prepare with `settings`,
    keeping base's tokenizer and pretraining. A variant that changes what pretraining read is
    refused: its tokenizer and pretraining would not be the ones its settings name."""
    shutil.copytree(base, workdir, symlinks=True)
    shutil.copy2(ROOT / "params.yaml", workdir / "params.yaml")  # this workspace's params, not the base variant's
    sh(sys.executable, "-m", "dvc", "exp", "run", *set_flags(seed, settings), "--single-item", "prepare", cwd=workdir)
    changed = [name for name in PRETRAINING_DATA if (workdir / name).read_bytes() != (base / name).read_bytes()]
    if changed:
        raise RuntimeError(f"--paired: {' '.join(settings)} changes {', '.join(changed)}; "
                           "a paired variant may change only the chat data and the stages from sft on")
    return run_one(seed, settings, workdir, ("repro", "--downstream", "sft"))


def run_paired(variants: dict[str, list[str]], seeds: list[int], jobs: int, tmp: Path) -> dict[tuple[str, int], dict]:
    first, *others = variants
    with ThreadPoolExecutor(jobs) as pool:

        def base_then_variants(seed: int):
            """The seed's whole pipeline, then its variants queued (they start as workers free up)."""
            base = copy_workspace(tmp / f"{first}-{seed}")
            metrics = run_one(seed, variants[first], base)
            return metrics, {name: pool.submit(run_chat_stages, seed, variants[name], base, tmp / f"{name}-{seed}")
                             for name in others}

        runs = {}
        for seed, future in [(s, pool.submit(base_then_variants, s)) for s in seeds]:
            runs[first, seed], pending = future.result()
            runs |= {(name, seed): variant.result() for name, variant in pending.items()}
        return runs


def finished(futures: dict[tuple[str, int], Future]) -> dict[tuple[str, int], dict]:
    """The metrics of the runs that finished; a failed run is reported and left out of the table,
    so one failure does not lose the others."""
    results = {}
    for run, future in futures.items():
        try:
            results[run] = future.result()
        except RuntimeError as error:
            print(f"{run[0]} seed {run[1]} failed: {error}", file=sys.stderr, flush=True)
    return results


def run_all(variants: dict[str, list[str]], seeds: list[int], jobs: int, paired: bool) -> dict[tuple[str, int], dict]:
    runs = [(name, seed) for name in variants for seed in seeds]
    with tempfile.TemporaryDirectory(prefix="tinyllm-seeds-") as tmp:
        if paired:
            return run_paired(variants, seeds, jobs, Path(tmp))
        dirs = {run: copy_workspace(Path(tmp) / f"{run[0]}-{run[1]}") for run in runs}
        with ThreadPoolExecutor(jobs) as pool:
            return finished({run: pool.submit(run_one, run[1], variants[run[0]], dirs[run]) for run in runs})


def table(variants: dict[str, list[str]], seeds: list[int], runs: dict[tuple[str, int], dict]) -> list[str]:
    """One row per metric; per variant and stage the mean ± std over seeds, then each seed's value
    (only when there is one variant, to keep the table readable)."""
    cols = [(name, stage) for name in variants for stage in STAGES]
    head = [f"{name} {stage}" if len(variants) > 1 else f"{stage} mean ± std" for name, stage in cols]
    per_seed = [(seed, stage) for seed in seeds for stage in STAGES] if len(variants) == 1 else []
    head += [f"seed {seed} ({stage})" for seed, stage in per_seed]
    lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    only = next(iter(variants))
    for key in METRICS:
        cells = []
        for name, stage in cols:
            values = [runs[name, seed][stage][key] for seed in seeds
                      if (name, seed) in runs and key in runs[name, seed][stage]]
            cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
                         else f"{values[0]:.3f}" if values else "–")
        cells += [f"{runs[only, seed][stage][key]:.3f}" if key in runs.get((only, seed), {}).get(stage, {}) else "–"
                  for seed, stage in per_seed]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--variant", action="append", default=[],
                        help="name:key=value,key=value (repeatable; default: the committed params)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each in its own copy of the workspace)")
    parser.add_argument("--paired", action="store_true",
                        help="other variants rerun prepare and sft on from the first variant's run of each seed")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/seeds.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {}
    for spec in args.variant or ["committed:"]:
        name, _, settings = spec.partition(":")
        variants[name] = [s for s in settings.split(",") if s]
    start = time.perf_counter()
    runs = run_all(variants, seeds, args.jobs, args.paired)
    if not runs:
        sys.exit("every run failed (above); no table written")
    lines = ["# The default pipeline over several seeds", "",
             (f"{platform.machine()} ({platform.node()}), {time.strftime('%Y-%m-%d')}, commit "
              f"{sh('git', 'describe', '--always', '--dirty').strip()}; seeds {', '.join(map(str, seeds))}; "
              f"{args.jobs} at once, {time.perf_counter() - start:.0f} s in all. "
              f"Command: `python reports/bench/seeds/run.py {' '.join(sys.argv[1:])}`."), ""]
    lines += [f"- {name}: {', '.join(settings) or 'the committed params'}" for name, settings in variants.items()]
    lines += [""] + table(variants, seeds, runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
