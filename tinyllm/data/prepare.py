"""The prepare stage: pretraining text, fact eval items, the world and its chat data, in one folder.

    dvc repro prepare     # stages/prepare.py → prepare(params, Path("artifacts/data"), lexicon)

`data.source: world` generates the embedded fictional world (tinyllm/data/world.py);
`data.source: jsonl` checks a user's `{"text": ...}` file line by line and copies its texts.
Either way out_dir gets pretrain.jsonl, eval_facts.jsonl, world.json (`null` for a user's corpus)
and the chat files of tinyllm/data/chat_data.py (CHAT_OUTPUTS: SFT, identity, preference and
eval sets; empty for a user's corpus), so the stage's outputs are always the same files.
Everything is first written to a staging folder inside out_dir and moved into place only when
all of it succeeded: a bad input line leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from tinyllm.config import DataConfig, Params
from tinyllm.data.chat_data import CHAT_OUTPUTS, chat_files
from tinyllm.data.jsonl import read_jsonl, validate_pretrain, write_jsonl
from tinyllm.data.world import build_world, fact_prompts, pretrain_documents
from tinyllm.errors import DataError

log = logging.getLogger(__name__)

OUTPUTS = ("pretrain.jsonl", "eval_facts.jsonl", "world.json", *CHAT_OUTPUTS)


def prepare(params: Params, out_dir: Path, lexicon_path: Path) -> dict:
    """Write pretrain.jsonl, eval_facts.jsonl, world.json and the chat files into out_dir.

    Args:
        params: Uses `params.data` and `params.seed`.
        out_dir: Created if missing; only the OUTPUTS files in it are replaced.
        lexicon_path: The world's word lists (used when data.source is "world").

    Returns:
        Stats: documents, characters, bad_lines_skipped, people, eval_facts, and one record count
        per chat file keyed by its name without ".jsonl" (sft_single, ..., eval_dpo).

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
            stats = _prepare_jsonl(params.data, staging)
        for name in OUTPUTS:
            os.replace(staging / name, out_dir / name)
    log.info("prepared %s: %s", out_dir, ", ".join(f"{k} {v}" for k, v in stats.items()))
    return stats


def _prepare_world(params: Params, staging: Path, lexicon_path: Path) -> dict:
    cfg = params.data.world
    world = build_world(cfg, params.seed, lexicon_path)
    docs = pretrain_documents(world, cfg, params.seed)
    facts = fact_prompts(world)
    write_jsonl(staging / "pretrain.jsonl", ({"text": d} for d in docs))
    write_jsonl(staging / "eval_facts.jsonl", facts)
    (staging / "world.json").write_text(json.dumps(world.to_json(), ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    chat = {name: write_jsonl(staging / name, records) for name, records in chat_files(world, params.seed).items()}
    return {"documents": len(docs), "characters": sum(map(len, docs)), "bad_lines_skipped": 0,
            "people": len(world.people), "eval_facts": len(facts), **_chat_stats(chat)}


def _prepare_jsonl(data: DataConfig, staging: Path) -> dict:
    """Stream the user's file through validation into pretrain.jsonl, keeping only "text"."""
    reader = read_jsonl(data.pretrain_path, validate_pretrain, data.on_bad_line)
    characters = 0

    def texts():
        nonlocal characters
        for record in reader:
            characters += len(record["text"])
            yield {"text": record["text"]}

    documents = write_jsonl(staging / "pretrain.jsonl", texts())
    if documents == 0:
        raise DataError(f"{data.pretrain_path}: no usable documents ({reader.n_bad} bad lines skipped); "
                        'each line must look like {"text": "..."}')
    write_jsonl(staging / "eval_facts.jsonl", [])
    (staging / "world.json").write_text("null\n", encoding="utf-8")
    chat = {name: write_jsonl(staging / name, []) for name in CHAT_OUTPUTS}
    return {"documents": documents, "characters": characters, "bad_lines_skipped": reader.n_bad,
            "people": 0, "eval_facts": 0, **_chat_stats(chat)}


def _chat_stats(counts: dict[str, int]) -> dict[str, int]:
    return {name.removesuffix(".jsonl"): n for name, n in counts.items()}
