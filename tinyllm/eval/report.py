"""The eval stage's library entry: metrics JSON, a markdown report and PNG curves under reports/.

    run_eval(params, ckpt_dir=Path("artifacts/pretrain"), token_dir=Path("artifacts/tokens"),
             facts=Path("artifacts/data/eval_facts.jsonl"), live_dir=Path("reports/live/pretrain"),
             out_dir=Path("reports/eval"))
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt

from tinyllm.config import Params
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.eval.metrics import fact_accuracy, perplexity, sample_continuations
from tinyllm.train.checkpoint import load_model, read_config
from tinyllm.train.runtime import resolve_device, resolve_dtype


def read_curve(live_dir: Path, name: str) -> tuple[list[int], list[float]]:
    """A dvclive metric's (steps, values), e.g. name="train/loss"; empty when not logged."""
    file = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not file.exists():
        return [], []
    with file.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    value_key = name.split("/")[-1]
    return [int(r["step"]) for r in rows], [float(r[value_key]) for r in rows]


def plot_curves(live_dir: Path, out_file: Path) -> None:
    """Train/val loss and learning rate against step, as one PNG."""
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in ("train/loss", "val/loss"):
        steps, values = read_curve(live_dir, name)
        ax_loss.plot(steps, values, label=name, marker="o" if name.startswith("val") else None, ms=3)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    ax_loss.legend()
    ax_lr.plot(*read_curve(live_dir, "lr"))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def _markdown(ckpt_meta: dict, metrics: dict, fact_rows: list[dict], samples: list[dict]) -> str:
    summary = ckpt_meta.get("summary", {})
    lines = [
        "# Evaluation report",
        "",
        f"Model: {summary.get('params', 0) / 1e6:.2f}M parameters, stage `{ckpt_meta.get('stage')}`, "
        f"{ckpt_meta.get('steps')} steps, {summary.get('tokens_seen', 0) / 1e6:.2f}M tokens "
        f"({summary.get('epochs', 0):.1f} epochs) in {summary.get('train_seconds', 0)} s.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| val loss | {metrics['val']['loss']:.4f} |",
        f"| val perplexity | {metrics['val']['ppl']:.3f} |",
    ]
    lines += [f"| fact accuracy: {k} | {v:.3f} |" for k, v in metrics.get("facts", {}).items() if k != "n_prompts"]
    lines += ["", "![loss curves](loss.png)", "", "## Fact completion (greedy)", "",
              "| prompt | answer | model | ok |", "|---|---|---|---|"]
    shown = [r for r in fact_rows if not r["correct"]][:10] + [r for r in fact_rows if r["correct"]][:10]
    lines += [f"| {r['prompt']} | {r['answer']} | {r['output'].strip() or '∅'} | {'✓' if r['correct'] else '✗'} |"
              for r in shown]
    lines += ["", "## Sampled continuations (temperature 0.8, top-k 20)", ""]
    lines += [f"- **{s['prompt']}**{s['output']}" for s in samples]
    return "\n".join(lines).replace("\r", " ") + "\n"


def run_eval(params: Params, ckpt_dir: Path, token_dir: Path, facts: Path, live_dir: Path, out_dir: Path) -> dict:
    """Score the checkpoint and write metrics.json, report.md and loss.png to `out_dir`."""
    cfg = params.eval
    device = resolve_device(params.runtime)
    dtype = resolve_dtype(params.runtime, device)
    model = load_model(ckpt_dir, device)
    tok = load_tokenizer(ckpt_dir)
    meta = read_config(ckpt_dir)
    metrics = {"val": perplexity(model, token_dir, model.config.max_seq_len, cfg.val_max_tokens, device, dtype)}
    items = list(read_jsonl(facts, lambda obj: None))
    fact_rows = []
    if items:
        metrics["facts"], fact_rows = fact_accuracy(model, tok, items, cfg.max_new_tokens, cfg.max_fact_prompts,
                                                    params.seed)
    prompts = [r["prompt"] for r in fact_rows[: cfg.n_samples]] or ["The", "我"][: cfg.n_samples]
    samples = sample_continuations(model, tok, prompts, 3 * cfg.max_new_tokens, params.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(live_dir, out_dir / "loss.png")
    (out_dir / "report.md").write_text(_markdown(meta, metrics, fact_rows, samples), encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
