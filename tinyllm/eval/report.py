"""The eval stage's library entry: metrics JSON, a markdown report and PNG curves under reports/.

    run_eval(params, {"pretrain": Path("artifacts/pretrain"), "sft": Path("artifacts/sft")},
             token_dir=Path("artifacts/tokens"), data_dir=Path("artifacts/data"),
             live_dir=Path("reports/live/pretrain"), out_dir=Path("reports/eval"))
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt

from tinyllm import cpu_threads
from tinyllm.config import Params
from tinyllm.data.chat import is_message
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.errors import ConfigError
from tinyllm.eval.benchmark import run_benchmark
from tinyllm.eval.chat_eval import (
    abstain_rate,
    answer_accuracy,
    chat_replies,
    chosen_style_rate,
    preference_accuracy,
    reply_loss,
    reward_margin,
    verified_accuracy,
)
from tinyllm.eval.metrics import expert_balance, fact_accuracy, perplexity
from tinyllm.train.checkpoint import is_checkpoint, load_model, read_config
from tinyllm.train.runtime import compile_cache_counts, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


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


CHAT_SETS = {"qa": "eval_qa.jsonl", "multi_turn": "eval_multi.jsonl", "identity": "eval_identity.jsonl",
             "unknown": "eval_unknown.jsonl"}
ROW_NAMES = {"val_loss": "val loss (pretraining text)", "val_ppl": "val perplexity (pretraining text)",
             "heldout_loss": "reply loss, held-out conversations", "heldout_loss_single": "… single-turn",
             "heldout_loss_multi": "… multi-turn", "heldout_ppl": "reply perplexity, held-out conversations",
             "moe_max_load": "busiest expert's load ÷ fair share (MoE; 1 is even)", "facts": "fact cloze accuracy",
             "qa_seen": "QA, people seen in SFT", "qa_heldout": "QA, held-out people",
             "qa_heldout_zh": "… asked in Chinese", "qa_heldout_en": "… asked in English",
             "multi_turn": "multi-turn follow-ups, held-out people", "identity": "identity answer rate",
             "unknown_abstain": "says it does not know, people not in the world",
             "known_false_abstain": "says it does not know, people in the world (should not)",
             "arith_heldout": "arithmetic, held-out sums in chat (greedy)", "arith_heldout_zh": "… asked in Chinese",
             "arith_heldout_en": "… asked in English", "arith_pass8": "… right in any of 8 samples (temperature 1)",
             "preference": "preference accuracy, held-out pairs",
             "preference_wrong_fact": "… rejected = a wrong fact", "preference_unhelpful": "… rejected = unhelpful",
             "pref_margin": "reward margin vs the SFT model (β·nats), held-out pairs",
             "chosen_style": "free replies = the chosen reply", "rejected_style": "free replies = the rejected reply"}


def _read_items(path: Path) -> list[dict]:
    return list(read_jsonl(path, lambda obj: None)) if path.exists() else []


def benchmark_paths(params: Params, data_dir: Path) -> dict[str, Path]:
    """eval.benchmarks by name (file or folder stem), plus the world's own when prepare wrote one."""
    paths = {Path(p).stem: Path(p) for p in params.eval.benchmarks}
    if len(paths) < len(params.eval.benchmarks) or "world" in paths:
        raise ConfigError(f"eval.benchmarks={params.eval.benchmarks}: each needs a name (file or folder stem) of "
                          "its own, and not 'world' (the embedded world's benchmark)")
    world = data_dir / "eval" / "bench_world.jsonl"
    if world.exists() and world.stat().st_size:
        paths["world"] = world
    return paths


def read_prompts(path: str) -> list[list[dict]]:
    """eval.prompts as conversations that end with a user turn."""
    if not path:
        return []
    def problem(obj) -> str | None:
        if not isinstance(obj, dict):
            return 'expected an object with a "prompt" string or a "messages" list'
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            return None
        messages = obj.get("messages")
        well_formed = isinstance(messages, list) and messages and all(map(is_message, messages))
        if well_formed and messages[-1]["role"] == "user":
            return None
        return 'needs a "prompt" string, or "messages" (role/content) that end with a user turn'

    items = read_jsonl(Path(path), problem)
    return [item["messages"] if "messages" in item else [{"role": "user", "content": item["prompt"]}]
            for item in items]


class Stopwatch:
    """Seconds per part of a checkpoint's evaluation, for the log: eval is one of the pipeline's
    longest stages, and on a GPU its parts cost differently than on the CPU."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"{sum(self.seconds.values()):.1f} s in its parts ({parts})"


def evaluate_checkpoint(params: Params, ckpt_dir: Path, token_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """Every metric for one checkpoint: (flat metrics, rows of scored items for the report)."""
    cfg = params.eval
    clock = Stopwatch()
    with clock.part("load"):
        device = resolve_device(params.runtime)
        dtype = resolve_dtype(params.runtime, device)
        cpu_threads.configure(params.runtime.threads, device)
        model = load_model(ckpt_dir, device)
        tok = load_tokenizer(ckpt_dir)
        config = read_config(ckpt_dir)
    chat = config["stage"] != "pretrain"
    trained_len = config.get("train", {}).get("seq_len") or model.config.max_seq_len
    with clock.part("val perplexity"):
        val = perplexity(model, token_dir, trained_len, cfg.val_max_tokens, device, dtype)
    metrics, rows = {"val_loss": val["loss"], "val_ppl": val["ppl"]}, {}
    with clock.part("reply loss"):
        losses = {kind: reply_loss(model, tok, [r["conversations"] for r in
                                                _read_items(data_dir / "chat" / f"heldout_{kind}.jsonl")])
                  for kind in ("single", "multi")}
    tokens = sum(n for _, n in losses.values())
    if tokens:
        metrics["heldout_loss"] = sum(loss * n for loss, n in losses.values()) / tokens
        metrics["heldout_ppl"] = math.exp(metrics["heldout_loss"])
        metrics.update({f"heldout_loss_{kind}": loss for kind, (loss, n) in losses.items() if n})
    if model.config.moe.enabled:
        with clock.part("expert balance"):
            balance = expert_balance(model, token_dir, trained_len)
        metrics["moe_max_load"] = max(balance["max_over_mean"].values())
        metrics["moe_balance"] = balance
    facts = _read_items(data_dir / "eval" / "eval_facts.jsonl")
    if facts:
        with clock.part("facts"):
            detail, rows["facts"] = fact_accuracy(model, tok, facts, cfg.max_new_tokens, cfg.max_fact_prompts,
                                                  params.seed)
        metrics["facts"] = detail["overall"]
        metrics["facts_detail"] = detail
    for name, file in CHAT_SETS.items():
        items = _read_items(data_dir / "eval" / file)
        if items:
            with clock.part(name):
                acc, rows[name] = answer_accuracy(model, tok, items, cfg.max_new_tokens, cfg.max_chat_prompts,
                                                  params.seed)
            if name == "qa":
                metrics.update({f"qa_{key.replace('/', '_')}": v for key, v in acc.items() if key != "overall"})
                metrics["known_false_abstain"] = abstain_rate(rows[name])
            elif name == "unknown":  # no answer is right but saying one does not know
                metrics["unknown_abstain"] = abstain_rate(rows[name])
            else:
                metrics[name] = acc["overall"]
    problems = _read_items(data_dir / "eval" / "eval_arith.jsonl")
    if chat and problems:
        with clock.part("arith"):
            arith, rows["arith"] = verified_accuracy(model, tok, problems, cfg.max_new_tokens, params.seed)
        metrics.update(arith)
    pairs = _read_items(data_dir / "eval" / "eval_dpo.jsonl")
    if pairs:
        with clock.part("preference"):
            pref, rows["pair_logps"] = preference_accuracy(model, tok, pairs)
        metrics["preference"] = pref["overall"]
        metrics.update({f"preference_{kind}": v for kind, v in pref.items() if kind != "overall"})
        with clock.part("style"):
            style, rows["style"] = chosen_style_rate(model, tok, pairs, cfg.max_new_tokens, cfg.max_chat_prompts,
                                                     params.seed)
        metrics.update({"chosen_style": style["chosen"], "rejected_style": style["rejected"]})
    for name, path in benchmark_paths(params, data_dir).items():
        with clock.part(f"benchmark {name}"):
            result = run_benchmark(model, tok, path, chat, cfg.shots, cfg.max_bench_items, params.seed)
        metrics[f"bench_{name}"] = result["accuracy"]
        metrics.setdefault("bench_detail", {})[name] = result
    prompts = read_prompts(cfg.prompts)
    if chat and prompts:
        with clock.part("prompts"):
            rows["prompts"] = chat_replies(model, tok, prompts, cfg.max_new_tokens)
        rows["prompt_messages"] = prompts
    cache = compile_cache_counts()  # on a GPU: the decode step, from the cache if compiled ahead
    compiled = f"; graphs from the compile cache so far: {cache['hits']} of {sum(cache.values())}" \
        if any(cache.values()) else ""
    log.info("scored %s in %s%s", ckpt_dir, clock, compiled)
    return metrics, rows


PLAIN_NUMBERS = ("val_loss", "val_ppl", "moe_max_load", "heldout_loss", "heldout_loss_single", "heldout_loss_multi",
                 "heldout_ppl", "pref_margin")
"""Metrics shown as numbers; the rest are shares, shown as percentages."""


def _benchmark_rows(results: dict[str, dict], stages: list[str]) -> list[str]:
    """One row per benchmark (with its chance level) and one per subject when it has several."""
    lines = []
    names = dict.fromkeys(n for s in stages for n in results[s].get("bench_detail", {}))
    for name in names:
        detail = [results[s].get("bench_detail", {}).get(name) for s in stages]
        first = next(d for d in detail if d)
        lines.append(f"| benchmark {name} ({first['questions']} questions, chance {first['chance']:.1%}) | "
                     + " | ".join("–" if d is None else f"{d['accuracy']:.1%}" for d in detail) + " |")
        if len(first["subjects"]) > 1:
            for subject in first["subjects"]:
                lines.append(f"| … {subject} | " + " | ".join(
                    "–" if d is None else f"{d['subjects'][subject]:.1%}" for d in detail) + " |")
    return lines


def _cell(text: str) -> str:
    """Text as one markdown table cell: one line, pipes escaped, ∅ when empty."""
    return text.strip().replace("|", "\\|").replace("\n", " ") or "∅"


def _unknown_table(rows: dict[str, dict], n: int = 6) -> list[str]:
    """A few questions about people who are not in the world, answered before and after DPO."""
    shown = [s for s in ("sft", "dpo") if "unknown" in rows.get(s, {})]
    if not shown:
        return []
    lines = ["## Questions about people who are not in the world (greedy)", "",
             "| question | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for i, row in enumerate(rows[shown[0]]["unknown"][:n]):
        cells = [_cell(rows[s]["unknown"][i]["reply"]) for s in shown]
        lines.append(f"| {_cell(row['messages'][-1]['content'])} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _prompt_table(rows: dict[str, dict], stages: list[str]) -> list[str]:
    """Every chat stage's greedy reply to each eval.prompts prompt, side by side."""
    chat_stages = [s for s in stages if "prompts" in rows[s]]
    if not chat_stages:
        return []
    prompts = rows[chat_stages[0]]["prompt_messages"]
    lines = ["## Replies to eval.prompts (greedy)", "", "| prompt | " + " | ".join(chat_stages) + " |",
             "|---|" + "---|" * len(chat_stages)]
    for i, messages in enumerate(prompts):
        cells = [_cell(rows[s]["prompts"][i]) for s in chat_stages]
        lines.append(f"| {_cell(messages[-1]['content'])} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _kept_note(summary: dict) -> str:
    """Which weights a training stage kept, when validation chose them."""
    if "kept_step" not in summary:
        return ""
    return (f" Kept the weights of step {summary['kept_step']} (val loss {summary['val/loss']:.4f}; "
            f"the last step's {summary['val/last_loss']:.4f}).")


def _markdown(results: dict[str, dict], rows: dict[str, dict], meta: dict) -> str:
    stages = list(results)
    summary = meta.get("summary", {})
    active = (f" ({summary['params_active'] / 1e6:.2f}M active per token)"
              if summary.get("params_active", summary.get("params")) != summary.get("params") else "")
    lines = ["# Evaluation report", "",
             (f"Pretrained model: {summary.get('params', 0) / 1e6:.2f}M parameters{active}, {meta.get('steps')} steps, "
             f"{summary.get('tokens_seen', 0) / 1e6:.2f}M tokens ({summary.get('epochs', 0):.1f} epochs)."
             f"{_kept_note(summary)}"), "",
             "## What each stage bought", "",
             "| metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for key, label in ROW_NAMES.items():
        values = [results[s].get(key) for s in stages]
        if any(v is not None for v in values):
            fmt = "{:.1%}" if key not in PLAIN_NUMBERS else "{:.3f}"
            lines.append(f"| {label} | " + " | ".join("–" if v is None else fmt.format(v) for v in values) + " |")
    lines += _benchmark_rows(results, stages)
    lines += ["", "![pretraining loss curves](loss.png)", ""]
    lines += _unknown_table(rows)
    lines += _prompt_table(rows, stages)
    fact_rows = rows.get(stages[0], {}).get("facts", [])
    if fact_rows:
        lines += [f"## Fact completion after {stages[0]} (greedy)", "", "| prompt | answer | model | ok |",
                  "|---|---|---|---|"]
        shown = [r for r in fact_rows if not r["correct"]][:8] + [r for r in fact_rows if r["correct"]][:8]
        lines += [f"| {_cell(r['prompt'])} | {_cell(r['answer'])} | {_cell(r['output'])} | "
                  f"{'✓' if r['correct'] else '✗'} |" for r in shown]
    dialogue_sets = [name for name in (*CHAT_SETS, "arith", "style")  # unknown people: their own table above
                     if name != "unknown" and any(name in rows[s] for s in stages)]
    if dialogue_sets:
        lines += ["", "## Sample dialogues (greedy), each set with its best stage", ""]
    for name in dialogue_sets:
        key = {"qa": "qa_heldout", "style": "chosen_style", "arith": "arith_heldout"}.get(name, name)
        best = max((s for s in stages if name in rows[s]), key=lambda s: results[s].get(key) or 0)
        lines.append(f"**{name}**, {best} model:")
        for r in rows[best][name][:4]:
            turns = " / ".join(f"{m['role']}: {_cell(m['content'])}" for m in r["messages"])
            lines.append(f"- {turns} → **{_cell(r['reply'])}** {'✓' if r['correct'] else '✗'}"
                         f" (expects “{r['answer']}”)")
        lines.append("")
    return "\n".join(lines).replace("\r", " ") + "\n"


def run_eval(params: Params, checkpoints: dict[str, Path], token_dir: Path, data_dir: Path, live_dir: Path,
             out_dir: Path) -> dict:
    """Score each stage's checkpoint; write metrics.json, report.md and loss.png to `out_dir`.

    A stage whose folder holds no checkpoint (lora with lora.enabled false) is left out.
    """
    checkpoints = {stage: path for stage, path in checkpoints.items() if is_checkpoint(path)}
    results, rows = {}, {}
    for stage, ckpt_dir in checkpoints.items():
        results[stage], rows[stage] = evaluate_checkpoint(params, ckpt_dir, token_dir, data_dir)
    reference = rows.get("sft", {}).get("pair_logps")
    for stage, metrics in results.items():  # DPO's implicit reward of each stage, the SFT model as reference
        if reference is not None and "pair_logps" in rows[stage]:
            metrics["pref_margin"] = reward_margin(rows[stage]["pair_logps"], reference, params.dpo.beta)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(live_dir, out_dir / "loss.png")
    meta = read_config(next(iter(checkpoints.values())))
    (out_dir / "report.md").write_text(_markdown(results, rows, meta), encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results
