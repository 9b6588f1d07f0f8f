"""What a chat stage spends on its data before the first step: encoding the .jsonl files itself (as
sft and lora did until 2026-12-05) or memory-mapping the set folders of the encode_chats stage
(issue 22: start-up). Each way runs in a fresh process, so its peak memory is its own; both end
with the stage's ChatBatches built, and the script checks that they give the same batches.

    python reports/bench/data/chat_sets.py artifacts/tokenizer /tmp/mm200k/sft.jsonl \
        --out reports/bench/data/chat_sets_NAME.md

The committed table: 200,000 MiniMind-shaped conversations (`python reports/bench/gpu/minimind_shaped.py
--conversations 200000 --write /tmp/mm200k`, from the default world).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinyllm.data.chat import ChatBatches
from tinyllm.data.chat_tokens import encode_chat_files, load_chats
from tinyllm.data.tokenizer import ENDOFTEXT, load_tokenizer, special_id


def peak_resident_mb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would count the parent's
    peak before the fork as well)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure(tokenizer: Path, sources: list[Path]) -> dict:
    """Seconds to load the sources and build the stage's batches, peak resident memory, a digest of 4 batches."""
    start = time.perf_counter()
    tok = load_tokenizer(tokenizer)
    examples = load_chats(sources, tok, None)
    loaded = time.perf_counter()
    batches = iter(ChatBatches(examples, 32, 511, seed=0, pad_id=special_id(tok, ENDOFTEXT)))
    digest = hashlib.sha256()
    for _ in range(4):
        for key, tensor in sorted(next(batches).items()):
            digest.update(key.encode() + tensor.numpy().tobytes())
    return {"load_s": loaded - start, "batches_s": time.perf_counter() - loaded,
            "peak_mb": peak_resident_mb(), "digest": digest.hexdigest(), "conversations": len(examples)}


def in_fresh_process(tokenizer: Path, sources: list[Path]) -> dict:
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from chat_sets import measure; "
            "print(json.dumps(measure(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tokenizer), *map(str, sources)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("files", type=Path, nargs="+", help=".jsonl files of conversations")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        metas = encode_chat_files(args.files, load_tokenizer(args.tokenizer), None, Path(scratch))
        encode_s = time.perf_counter() - start
        sets = [Path(scratch) / f.stem for f in args.files]
        size_mb = sum(p.stat().st_size for s in sets for p in s.iterdir()) / 2**20
        from_files = in_fresh_process(args.tokenizer, args.files)
        from_sets = in_fresh_process(args.tokenizer, sets)
    assert from_files["digest"] == from_sets["digest"], "the two ways gave different batches"
    tokens = sum(m["tokens"] for m in metas.values())
    lines = [f"# A chat stage's data before its first step ({platform.node()}, {os.cpu_count()} cores)", "",
             (f"{from_files['conversations']:,} conversations, {tokens / 1e6:.1f}M tokens, "
              f"{sum(f.stat().st_size for f in args.files) / 2**20:.0f} MB of JSON; the set folders: {size_mb:.0f} MB, "
              f"written by encode_chats in {encode_s:.1f} s (once per pipeline)."), "",
             "| the stage reads | loading (s) | building batches (s) | peak memory (MB) |", "|---|---|---|---|"]
    for name, r in (("the .jsonl files, encoding them", from_files), ("encode_chats' set folders", from_sets)):
        lines.append(f"| {name} | {r['load_s']:.1f} | {r['batches_s']:.1f} | {r['peak_mb']:,.0f} |")
    table = "\n".join(lines) + "\n\nThe same first 4 batches of 32 × 512 both ways (ids, labels, padding: checked).\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
