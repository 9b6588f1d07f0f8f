"""How many facts pretraining knows at each step, next to its validation loss → stdout.

    python reports/bench/pretrain_facts/run.py          # ~6 min on 2 CPU cores, after `dvc repro`

Pretrains with the pipeline's params (tokens and tokenizer from artifacts/) but keeps every
resumable checkpoint (every 200 steps) and runs all max_steps (keep: last, no patience), then
scores each checkpoint on the fact cloze eval (artifacts/data/eval/eval_facts.jsonl, the same
600-prompt sample as eval). It asks whether the checkpoint `keep: best` picks by validation loss
is the one that knows the most. Not part of CI.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from tinyllm.config import CheckpointConfig, load_params
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.eval.metrics import fact_accuracy
from tinyllm.train.checkpoint import load_model
from tinyllm.train.distributed import TrainingRun
from tinyllm.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[3]
COLUMNS = ("overall", "split/sft", "split/heldout", "attribute/birth_year", "attribute/colour")


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, keep="last", patience=0))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints, last = Path(tmp) / "checkpoints", Path(tmp) / "last"
        run = TrainingRun(checkpoint=CheckpointConfig(interval=200, keep=100, resume="never"),
                          checkpoint_dir=checkpoints)
        summary = run_pretrain(params, ROOT / "artifacts/tokens", ROOT / "artifacts/tokenizer", last, run)
        newest = max(checkpoints.iterdir())  # its state.json holds the metrics history so far
        val = {entry["step"]: entry["val/loss"] for entry in json.loads((newest / "state.json").read_text())["history"]
               if "val/loss" in entry}
        val[params.pretrain.max_steps] = summary["val/last_loss"]
        tok, model = load_tokenizer(last), load_model(last)
        items = [json.loads(line) for line in (ROOT / "artifacts/data/eval/eval_facts.jsonl").open()]
        print("| step | val loss | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 2) + "|")
        for folder in [*sorted(checkpoints.iterdir()), last]:
            model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
            accuracy, _ = fact_accuracy(model.eval(), tok, items, 24, params.eval.max_fact_prompts, params.seed)
            step = params.pretrain.max_steps if folder == last else int(folder.name.removeprefix("step-"))
            print(f"| {step} | {val.get(step, float('nan')):.3f} | "
                  + " | ".join(f"{accuracy[c]:.1%}" for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
