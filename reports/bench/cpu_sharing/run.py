"""CPU sharing: training beside a busy program, on this machine's cores → reports/cpu_sharing.md.

    python reports/bench/cpu_sharing/run.py            # thread policies (2 min), then dvc repro -f twice (~25 min)
    python reports/bench/cpu_sharing/run.py --no-repro # the policies only

1. The default pretraining shape (192×4, seq 128, batch 16, vocab 1024, `tinyllm bench train`)
   under four thread policies, alone and beside `python -c "while True: pass"`:
   torch's default (one thread per core, `runtime.threads: auto`), the same with
   OMP_WAIT_POLICY=PASSIVE, one thread, and `runtime.threads: follow` (one per free core,
   tinyllm/cpu_threads.py).
2. The whole `dvc repro -f` with params.yaml's `runtime.threads` (set it to follow to measure
   that), beside the busy program and then alone (so the outputs left in the workspace are those
   of the run alone).

Run it on an otherwise idle machine: every figure is a ratio within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "reports/cpu_sharing.md"
BENCH = [sys.executable, "-m", "tinyllm.cli", "bench", "train", "--models", "tiny", "--seq-len", "128",
         "--batch-size", "16", "--vocab-size", "1024", "--device", "cpu", "--steps", "40", "--warmup", "10"]
POLICIES = {  # name → (environment, `bench train` flags)
    "torch's default (a thread per core; auto)": ({"OMP_NUM_THREADS": str(os.cpu_count())}, []),
    "the same, OMP_WAIT_POLICY=PASSIVE": ({"OMP_NUM_THREADS": str(os.cpu_count()), "OMP_WAIT_POLICY": "PASSIVE"}, []),
    "one thread": ({"OMP_NUM_THREADS": "1"}, []),
    "follow the free cores (follow)": ({}, ["--threads", "follow"]),
}
STAGES = ("pretrain", "sft", "lora", "dpo")


@contextmanager
def busy_program(on: bool):
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        time.sleep(0.5 if on else 0)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def bench_tokens_per_sec(env: dict, flags: list[str], out_dir: Path) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    subprocess.run([*BENCH, *flags, "--out", str(out_dir)], env={**clean, **env}, cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return json.loads((out_dir / "train_cpu.json").read_text())["rows"][0]["tokens_per_sec"]


def policies_table(tmp: Path) -> list[str]:
    lines = ["| threads | alone, tokens/s | beside a busy program, tokens/s | slowdown (fair sharing: 2×) |",
             "|---|---|---|---|"]
    for name, (env, flags) in POLICIES.items():
        rates = []
        for busy in (False, True):
            with busy_program(busy):
                rates.append(bench_tokens_per_sec(env, flags, tmp))
        lines.append(f"| {name} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.2f}× |")
        print(lines[-1], flush=True)
    return lines


def repro(busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    with busy_program(busy):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    seconds = {s: json.loads((ROOT / f"reports/metrics/{s}.json").read_text()).get("train_seconds") for s in STAGES}
    changes = re.findall(r"other programs are using [\d.]+ of \d+ cores: \d torch thread", proc.stdout + proc.stderr)
    return {"wall": wall, **seconds, "thread_changes": len(changes)}


def repro_table() -> list[str]:
    runs = {"beside a busy program": repro(busy=True), "alone": repro(busy=False)}
    lines = ["| `dvc repro -f` | wall | pretrain | sft | lora | dpo | thread-count changes logged |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['wall']:.0f} s | " + " | ".join(f"{r[s]:.0f} s" for s in STAGES)
                     + f" | {r['thread_changes']} |")
    ratio = runs["beside a busy program"]["wall"] / runs["alone"]["wall"]
    lines += ["", (f"Beside a busy program the whole pipeline took **{ratio:.2f}×** as long as alone "
                  "(target: at most 2.5×; fair sharing of 2 cores: 2×).")]
    print("\n".join(lines), flush=True)
    return lines


def _commit() -> str:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return git.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-repro", action="store_true", help="only the thread policies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policies = policies_table(Path(tmp))
    lines = ["# CPU sharing: training beside another busy program", "",
             (f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"{time.strftime('%Y-%m-%d')}, commit {_commit()}. "
             "Command: `python reports/bench/cpu_sharing/run.py`. The busy "
             "program is `python -c \"while True: pass\"` (one core's worth of work)."), "",
             "## Thread policies on the default pretraining shape", "",
             "192×4 model, seq 128, batch 16, fp32, `tinyllm bench train` (10 warm-up + 40 timed steps).", "",
             *policies, "",
             ("OpenMP threads spin while they wait for each other at the end of every parallel region. "
             "When another program holds a core, the thread on it runs in bursts and the others spin "
             "for it. The passive wait policy stops the spinning but costs time when the machine is "
             "idle; one thread per free core avoids both (tinyllm/cpu_threads.py).")]
    if not args.no_repro:
        lines += ["", "## The default pipeline", "", *repro_table()]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
