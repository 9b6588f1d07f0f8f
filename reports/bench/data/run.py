"""Benchmark of the data pipeline's prepare → train_tokenizer → tokenize stages on big corpora.

Why: the unit tests use kilobytes; a real corpus is gigabytes. This measures, per corpus size,
each stage's wall seconds, CPU seconds, throughput and peak RSS, so memory that grows with the
input (instead of staying flat, as the streaming design promises) shows up as a number.

How: a seeded JSON Lines corpus of about SIZE MB (Chinese and English text, ~1% duplicate lines,
~0.1% malformed lines, a few invalid UTF-8 lines) is generated once into --scratch. Each size gets
a fresh workspace there with its own params.yaml; every stage runs as `python -m stages.X` with
cwd = the workspace and PYTHONPATH = this repo, and its peak RSS comes from os.wait4 on that child.
Times include interpreter start-up and imports; the corpus is usually in the page cache.

    python reports/bench/data/run.py reports/bench/data --sizes-mb 100,1000
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tokenizers
import yaml

REPO = Path(__file__).resolve().parents[3]
STAGES = [("prepare", "stages.prepare"), ("train_tokenizer", "stages.train_tokenizer"),
          ("tokenize", "stages.tokenize_corpus")]
HAN = ("的一是不了人我在有他这中大来上个国到说们为子和你地出会也时要就可以对生能而那得于着下自之年过发后作里用道"
       "行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日者意无力"
       "它与长把机十民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产")
EN = ("the of and to a in is it you that he was for on are with as I his they be at one have this from or had by "
      "word but what some we can out other were all there when up use your how said an each she which do their "
      "time if will way about many then them write would like so these her long make thing see him two has look "
      "more day could go come did number sound no most people my over know water than call first who may down "
      "side been now find river city model data train token learn small language quickly slowly")


def zipf(words: list[str]) -> tuple[list[str], list[float]]:
    """Words with Zipf cumulative weights (the r-th word has weight 1/r): few frequent, most rare."""
    return words, list(itertools.accumulate(1 / r for r in range(1, len(words) + 1)))


def generate_corpus(path: Path, size_mb: int) -> dict:
    """Stream about size_mb MB of {"text"} lines to path (via a .part file); return what was put in."""
    rng = random.Random(0)
    zh = zipf(["".join(rng.choices(HAN, k=rng.choice((1, 2, 2, 2, 3)))) for _ in range(4000)])
    en = zipf(EN.split())

    def document() -> str:
        target = 100_000 if rng.random() < 0.0005 else rng.randint(200, 3000)
        p_en, parts, n = rng.random(), [], 0
        while n < target:
            if rng.random() < p_en:
                s = " ".join(rng.choices(en[0], cum_weights=en[1], k=rng.randint(5, 18))).capitalize() + ". "
            else:
                s = "".join(rng.choices(zh[0], cum_weights=zh[1], k=rng.randint(4, 16))) + rng.choice("。，！？；")
            if rng.random() < 0.05:
                s += "\n"
            parts.append(s)
            n += len(s)
        return "".join(parts)

    stats = {"lines": 0, "duplicates": 0, "malformed": 0, "invalid_utf8": 0}
    kept, budget, part = [], size_mb * 1_000_000, path.with_suffix(".part")
    with open(part, "wb") as f:
        while f.tell() < budget:
            roll = rng.random()
            if roll < 0.01 and kept:
                line, kind = rng.choice(kept), "duplicates"
            elif roll < 0.011:  # cut JSON, plain text, no "text" key, not an object: one line each
                text = document().replace("\n", " ")
                good = json.dumps({"text": text}, ensure_ascii=False)
                bad = rng.choice([good[: len(good) // 2], text, json.dumps({"content": text}), "[1, 2, 3]"])
                line, kind = bad.encode() + b"\n", "malformed"
            elif roll < 0.0111:
                text = document().replace("\n", " ").encode()
                line, kind = b'{"text": "broken \xff\xfe bytes ' + text + b'"}\n', "invalid_utf8"
            else:
                line, kind = (json.dumps({"text": document()}, ensure_ascii=False) + "\n").encode(), None
                if len(kept) < 1000:
                    kept.append(line)
                elif rng.random() < 0.01:
                    kept[rng.randrange(1000)] = line
            stats["lines"] += 1
            if kind:
                stats[kind] += 1
            f.write(line)
    part.replace(path)
    return stats


def corpus(scratch: Path, size_mb: int) -> tuple[Path, dict]:
    path, meta = scratch / f"corpus_{size_mb}mb.jsonl", scratch / f"corpus_{size_mb}mb.json"
    if not (path.exists() and meta.exists()):
        t0 = time.perf_counter()
        stats = generate_corpus(path, size_mb)
        meta.write_text(json.dumps({**stats, "generate_seconds": round(time.perf_counter() - t0, 1)}))
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    return path, json.loads(meta.read_text())


def run_stage(name: str, module: str, ws: Path) -> dict:
    """Run one stage as a child process; its wall time, CPU time and peak RSS (os.wait4's rusage)."""
    log = ws / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=ws, env=env, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{module} exited {proc.returncode}; end of {log}:\n{log.read_text()[-3000:]}")
    return {"stage": name, "seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def bench(scratch: Path, size_mb: int) -> dict:
    path, generated = corpus(scratch, size_mb)
    ws = scratch / f"ws_{size_mb}mb"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump({
        "seed": 1337,
        "data": {"source": "files", "pretrain": [str(path)], "sft": [], "dpo": [], "format": "auto",
                 "strict": False, "min_chars": 1, "max_chars": 0, "dedup": True},
        "tokenizer": {"vocab_size": 6400, "min_frequency": 2, "split_han": True, "max_corpus_bytes": 50_000_000},
        "tokenize": {"val_fraction": 0.005, "shard_tokens": 50_000_000, "batch_docs": 1024},
    }, sort_keys=False))
    input_mb = path.stat().st_size / 1e6
    stages = [run_stage(name, module, ws) for name, module in STAGES]
    splits = json.loads((ws / "artifacts/tokens/index.json").read_text())["splits"]
    tokens = splits["train"]["n_tokens"] + splits["val"]["n_tokens"]
    by = {s["stage"]: s for s in stages}
    for name in ("prepare", "tokenize"):
        by[name]["mb_per_s"] = round(input_mb / by[name]["seconds"], 1)
    by["tokenize"]["tokens_per_s"] = round(tokens / by["tokenize"]["seconds"])
    end_to_end = {"prepare+train_tokenizer+tokenize": sum(s["seconds"] for s in stages),
                  "prepare+tokenize": by["prepare"]["seconds"] + by["tokenize"]["seconds"]}
    return {"input_mb": round(input_mb, 1), "generated": generated, "stages": stages, "tokens": tokens,
            "end_to_end_seconds": {k: round(v, 2) for k, v in end_to_end.items()},
            "prepare_metrics": json.loads((ws / "reports/metrics/prepare.json").read_text())}


def markdown(machine: str, results: list[dict]) -> str:
    rows = ["| input MB | stage | seconds | CPU s | MB/s | tokens/s | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["stages"]:
            rows.append(f"| {r['input_mb']:.0f} | {s['stage']} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | "
                        f"{s.get('mb_per_s', '')} | {s.get('tokens_per_s', '')} | {s['peak_rss_mib']:.0f} |")
        for name, sec in r["end_to_end_seconds"].items():
            rows.append(f"| {r['input_mb']:.0f} | **{name}** | **{sec:.1f}** | | {r['input_mb'] / sec:.1f} | | |")
    notes = [f"- {r['input_mb']:.0f} MB: {r['tokens']:,} tokens; generated {r['generated']}; "
             f"prepare.json {r['prepare_metrics']}" for r in results]
    return "\n".join([f"# Data pipeline benchmark — {machine}", "", *rows, "", *notes]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sizes-mb", default="100,1000")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/tinyllm-data-bench"))
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    machine = (f"{platform.node()}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM; "
               f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}; "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    results = []
    for size in (int(s) for s in args.sizes_mb.split(",")):
        results.append(bench(args.scratch, size))
        print(f"{size} MB done: {results[-1]['end_to_end_seconds']}", flush=True)
    table = markdown(machine, results)
    print(table)
    (args.out_dir / "data_pipeline.md").write_text(table)
    (args.out_dir / "data_pipeline.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2,
                                                                ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
