"""The prepare stage: pretraining text, fact eval items and the world, in one folder.

    dvc repro prepare     # stages/prepare.py → prepare(params, Path("artifacts/data"), lexicon)

`data.source: world` generates the embedded fictional world (tinyllm/data/world.py);
`data.source: jsonl` checks a user's `{"text": ...}` file line by line and copies its texts.
Either way out_dir gets pretrain.jsonl, eval_facts.jsonl and world.json (`null` for a user's
corpus, so the stage's outputs are the same three files). Everything is first written to a
staging folder inside out_dir and moved into place only when all of it succeeded: a bad input
line leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from tinyllm.config import DataConfig, Params
from tinyllm.data.jsonl import read_jsonl, validate_pretrain, write_jsonl
from tinyllm.data.world import build_world, fact_prompts, pretrain_documents
from tinyllm.errors import DataError

log = logging.getLogger(__name__)

OUTPUTS = ("pretrain.jsonl", "eval_facts.jsonl", "world.json")


def prepare(params: Params, out_dir: Path, lexicon_path: Path) -> dict:
    """Write pretrain.jsonl, eval_facts.jsonl and world.json into out_dir.

    Args:
        params: Uses `params.data` and `params.seed`.
        out_dir: Created if missing; only the three output files in it are replaced.
        lexicon_path: The world's word lists (used when data.source is "world").

    Returns:
        Stats: documents, characters, bad_lines_skipped, people, eval_facts.

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
    return {"documents": len(docs), "characters": sum(map(len, docs)), "bad_lines_skipped": 0,
            "people": len(world.people), "eval_facts": len(facts)}


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
    return {"documents": documents, "characters": characters, "bad_lines_skipped": reader.n_bad,
            "people": 0, "eval_facts": 0}
