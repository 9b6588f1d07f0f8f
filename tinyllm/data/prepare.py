"""The prepare stage: pretraining text, fact eval items, the world and its chat data, in one folder.

    dvc repro prepare     # stages/prepare.py → prepare(params, Path("artifacts/data"), lexicon)

`data.source: world` generates the embedded fictional world (tinyllm/data/world.py);
`data.source: files` streams the corpora named in `data.pretrain`, `data.sft`, `data.identity` and `data.dpo`
(MiniMind, Seq-Monkey, ShareGPT, Alpaca, deepctrl: tinyllm/data/formats.py) one line at a time
through conversion, length filters and exact-duplicate removal, so memory does not grow with the
file size (only the duplicate hashes do: ~115 bytes of RSS per kept record, measured in
reports/data.md; `data.dedup: false` turns that off).
Either way out_dir gets the same files (OUTPUTS), in three places:

    pretrain.jsonl  world.json (`null` for a user's corpus)  dpo.jsonl
    chat/   sft_single, sft_multi, identity: what SFT, LoRA and the tokenizer train on;
            heldout_single, heldout_multi: SFT conversations held out for eval (both sources)
    eval/   the world's eval sets (eval_facts, eval_qa, eval_multi, eval_identity, bench_world),
            empty for a user's corpus, and eval_dpo: held-out preference pairs (the world's,
            or a held-out share of the user's)

Stages depend on the chat/ and eval/ folders rather than on their files, because DVC warns about
every empty file declared on its own, and some are empty by design (a user's corpus has no world
eval sets, and often no identity set). `data.heldout_share` of the SFT conversations (single- and
multi-turn apart) and of a user's preference pairs, at least `data.heldout_min` of each when
there are twice that many, is a seeded sample held out from training.
Everything is first written to a staging folder inside out_dir and moved into place only when
all of it succeeded: a bad input line leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tinyllm.config import DataConfig, Params
from tinyllm.data.chat_data import CHAT_OUTPUTS, chat_files
from tinyllm.data.format_names import KIND_FORMATS
from tinyllm.data.formats import convert, detect, record_text
from tinyllm.data.jsonl import read_jsonl, write_jsonl
from tinyllm.data.world import build_world, fact_prompts, pretrain_documents
from tinyllm.errors import DataError

log = logging.getLogger(__name__)

CHAT_FOLDER = ("sft_single.jsonl", "sft_multi.jsonl", "heldout_single.jsonl", "heldout_multi.jsonl", "identity.jsonl")


def data_path(name: str) -> str:
    """Where file `name` lives under artifacts/data/ ("chat/sft_single.jsonl", "eval/eval_qa.jsonl")."""
    if name in CHAT_FOLDER:
        return f"chat/{name}"
    return f"eval/{name}" if name.startswith(("eval_", "bench_")) else name


OUTPUTS = tuple(data_path(name) for name in ("pretrain.jsonl", "world.json", "eval_facts.jsonl", *CHAT_OUTPUTS,
                                               "heldout_single.jsonl", "heldout_multi.jsonl"))


def prepare(params: Params, out_dir: Path, lexicon_path: Path) -> dict:
    """Write pretrain.jsonl, eval_facts.jsonl, world.json and the chat files into out_dir.

    Args:
        params: Uses `params.data` and `params.seed`.
        out_dir: Created if missing; only the OUTPUTS files in it are replaced.
        lexicon_path: The world's word lists (used when data.source is "world").

    Returns:
        Stats: documents, characters, bad_lines_skipped, duplicates_removed, filtered_by_length,
        people, eval_facts, and one record count per chat file keyed by its name without ".jsonl"
        (sft_single, ..., eval_dpo).

    Raises:
        DataError: The user's corpus (or the lexicon) is wrong; out_dir is left unchanged.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:
        staging = Path(tmp)
        if params.data.source == "world":
            stats = _prepare_world(params, staging, lexicon_path)
        else:
            stats = _prepare_files(params.data, staging, params.seed)
        for kind in ("single", "multi"):
            stats[f"sft_{kind}"], stats[f"heldout_{kind}"] = hold_out(
                staging / f"chat/sft_{kind}.jsonl", staging / f"chat/heldout_{kind}.jsonl", params.data,
                f"{params.seed}/heldout_{kind}")
        for name in OUTPUTS:
            (out_dir / name).parent.mkdir(exist_ok=True)
            os.replace(staging / name, out_dir / name)
    log.info("prepared %s: %s", out_dir, ", ".join(f"{k} {v}" for k, v in stats.items()))
    return stats


def _prepare_world(params: Params, staging: Path, lexicon_path: Path) -> dict:
    cfg = params.data.world
    world = build_world(cfg, params.seed, lexicon_path)
    docs = pretrain_documents(world, cfg, params.seed)
    facts = fact_prompts(world)
    write_jsonl(staging / "pretrain.jsonl", ({"text": d} for d in docs))
    write_jsonl(staging / data_path("eval_facts.jsonl"), facts)
    (staging / "world.json").write_text(json.dumps(world.to_json(), ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    chat = {name: write_jsonl(staging / data_path(name), records)
            for name, records in chat_files(world, params.seed, cfg.arithmetic_answer).items()}
    return {"documents": len(docs), "characters": sum(map(len, docs)), "bad_lines_skipped": 0,
            "duplicates_removed": 0, "filtered_by_length": 0, "people": len(world.people), "eval_facts": len(facts),
            **_chat_stats(chat)}


def _prepare_files(data: DataConfig, staging: Path, seed: int) -> dict:
    """Stream the corpora named in params through conversion, filters and duplicate removal."""
    counts = Counter()
    documents = write_jsonl(staging / "pretrain.jsonl", _records(data, "pretrain", counts))
    if documents == 0:
        raise DataError(f"data.pretrain {data.pretrain}: no documents left after the length filters "
                        f"(data.min_chars={data.min_chars}, data.max_chars={data.max_chars})")
    chat = {name: 0 for name in CHAT_OUTPUTS}
    (staging / "chat").mkdir()
    with (staging / "chat/sft_single.jsonl").open("w", encoding="utf-8") as single, \
            (staging / "chat/sft_multi.jsonl").open("w", encoding="utf-8") as multi:
        for record in _records(data, "sft", counts):
            turns = sum(m["role"] == "user" for m in record["conversations"])
            out, name = (single, "sft_single.jsonl") if turns == 1 else (multi, "sft_multi.jsonl")
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            chat[name] += 1
    chat["identity.jsonl"] = write_jsonl(staging / "chat/identity.jsonl", _records(data, "identity", counts))
    write_jsonl(staging / "dpo.jsonl", _records(data, "dpo", counts))
    chat["dpo.jsonl"], chat["eval_dpo.jsonl"] = hold_out(staging / "dpo.jsonl", staging / "eval/eval_dpo.jsonl", data,
                                                         f"{seed}/heldout_dpo")
    write_jsonl(staging / "grpo.jsonl", _records(data, "grpo", counts))
    chat["grpo.jsonl"], chat["eval_arith.jsonl"] = hold_out(staging / "grpo.jsonl", staging / "eval/eval_arith.jsonl",
                                                            data, f"{seed}/heldout_grpo")
    for name in ("eval_facts.jsonl", *CHAT_OUTPUTS):
        if not (staging / data_path(name)).exists():  # the world's eval sets: none for a user's corpus
            write_jsonl(staging / data_path(name), [])
    (staging / "world.json").write_text("null\n", encoding="utf-8")
    for kind, stage in (("sft", "sft"), ("identity", "lora (unless lora.enabled is false)"), ("dpo", "dpo")):
        if not getattr(data, kind):
            log.warning("data.%s names no file: the %s stage will stop for want of data", kind, stage)
    if not data.grpo:
        log.info("data.grpo names no file: the grpo stage will write a note only")
    return {"documents": documents, "characters": counts["characters_pretrain"],
            **{key: counts[key] for key in ("bad_lines_skipped", "duplicates_removed", "filtered_by_length")},
            "people": 0, "eval_facts": 0, **_chat_stats(chat)}


def hold_out(source: Path, heldout: Path, data: DataConfig, seed: str) -> tuple[int, int]:
    """Move a seeded sample of `source`'s lines to `heldout`: data.heldout_share of them, at least
    data.heldout_min, at most half. Streams both files (big SFT sets stay out of memory).

    Returns:
        (lines kept in source, lines held out).
    """
    with source.open(encoding="utf-8") as f:
        n = sum(1 for _ in f)
    k = min(max(data.heldout_min, round(data.heldout_share * n)), n // 2)
    chosen = set(random.Random(seed).sample(range(n), k))
    heldout.parent.mkdir(parents=True, exist_ok=True)
    rest = source.with_name(source.name + ".rest")
    with source.open(encoding="utf-8") as src, rest.open("w", encoding="utf-8") as kept, \
            heldout.open("w", encoding="utf-8") as held:
        for i, line in enumerate(src):
            (held if i in chosen else kept).write(line)
    os.replace(rest, source)
    return n - k, k


def corpus_files(patterns: list[str], kind: str) -> list[Path]:
    """The files `data.<kind>` names, globs expanded (sorted), each once (however it is spelled);
    a pattern matching nothing is an error that names it."""
    files: list[Path] = []
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if is_glob else [Path(pattern)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data.{kind}: {pattern!r} matches no file")
        seen = {f.resolve() for f in files}
        files += [m for m in matches if m.resolve() not in seen]
    return files


def _records(data: DataConfig, kind: str, counts: Counter) -> Iterator[dict]:
    """Every usable record of the `kind` corpora in the pipeline's layout, one line at a time.

    A file's format is `data.format` for sft files when set, else the first format whose keys a
    line has and which converts. Bad lines go through the reader (file:line; they stop the run
    when data.strict). Records outside the length limits, and exact repeats of an earlier record
    of the same kind, are dropped and counted.
    """
    seen: set[int] = set()
    for path in corpus_files(getattr(data, kind), kind):
        reader = read_jsonl(path, lambda obj: None, "error" if data.strict else "skip")
        fixed = data.format if kind == "sft" and data.format != "auto" else None
        good = 0
        for obj in reader:
            fmt = fixed or detect(obj, KIND_FORMATS[kind])
            if fmt is None:
                seen_as = detect(obj)
                reader.bad_line((f"looks like {seen_as}" if seen_as else "its keys match no known format")
                                + f", but data.{kind} takes {' or '.join(KIND_FORMATS[kind])} "
                                "(tinyllm/data/formats.py)")
                continue
            record, problem = convert(fmt, obj)
            if problem:
                reader.bad_line(problem)
                continue
            if fixed is None:
                fixed = fmt  # one format per file, decided by its first good line
                log.info("%s: %s format", path, fmt)
            good += 1
            text = record_text(record)
            if len(text) < data.min_chars or 0 < data.max_chars < len(text):
                counts["filtered_by_length"] += 1
                continue
            if data.dedup:
                content = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
                digest = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big")
                if digest in seen:
                    counts["duplicates_removed"] += 1
                    continue
                seen.add(digest)
            counts[f"characters_{kind}"] += len(text)
            yield record
        counts["bad_lines_skipped"] += reader.n_bad
        if good == 0 and reader.n_bad == 0:
            log.warning("%s: empty file (data.%s), nothing read", path, kind)
        elif good == 0:
            raise DataError(f"{path}: no usable {kind} records ({reader.n_bad} bad lines, see the log above); "
                            f"data.{kind} takes {' or '.join(KIND_FORMATS[kind])}")


def _chat_stats(counts: dict[str, int]) -> dict[str, int]:
    return {name.removesuffix(".jsonl"): n for name, n in counts.items()}
