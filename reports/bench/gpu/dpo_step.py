"""Where does a DPO step's time go? (issue 22: on the H200 DPO's policy step runs at 39% of
pretraining's tokens/s, reports/gpu_speed.md.)

    python reports/bench/gpu/dpo_step.py --model 768x8 --device cuda --seq-len 512 --pairs 256
    python reports/bench/gpu/dpo_step.py --model tiny --device cpu --seq-len 128 --pairs 16 --steps 4

The pipeline's own preference pairs (`artifacts/data/dpo.jsonl`, encoded with the run's tokenizer),
packed as the dpo stage packs them, on random weights of a preset (the tokenizer's vocabulary),
bf16 autocast, AdamW, compiled as the training engine compiles (the model only); DPO's beta 0.1,
no NLL term, no system prompt. Three objectives
on the same rows, so each difference is one cause:
- dpo: the stage's `DPOLoss`: each sequence sees only itself (a mask over the packed row), and the
  per-token log-probs are taken from the logits outside the model, so outside the compiled graph;
- in-model loss: the same masked rows, the next-token loss computed inside the model's forward
  (as pretraining does), so the compiler fuses the fp32 softmax into the head;
- causal rows: the same rows without the mask (plain causal attention across the packed
  sequences), loss inside: what pretraining pays for as many positions.
For each: milliseconds a step (median after the warm-up steps) and positions a second; with
--profile, the ten CUDA (or CPU) kernels that take the most time in one more dpo step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from profiling import profile_table  # this folder's modules, beside this script
from regions import add_regions_flag, regions_compile_kwargs

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig, TrainConfig
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.preference import PreferenceBatches, encode_pairs, validate_preference
from tinyllm.data.tokenizer import ENDOFTEXT, load_tokenizer, special_id
from tinyllm.model.transformer import Transformer
from tinyllm.train.engine import build_optimizer
from tinyllm.train.objectives import DPOLoss


def in_model_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    return model(batch["input_ids"], labels=batch["labels"], segments=batch["segments"]).loss, {}


def causal_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    return model(batch["input_ids"], labels=batch["labels"]).loss, {}


OBJECTIVES = {"dpo": DPOLoss(beta=0.1), "in-model loss": in_model_loss, "causal rows": causal_loss}


def time_steps(objective, batches: list[dict], args, device: torch.device, profile: bool = False
               ) -> tuple[float, float, str]:
    """(median ms a step, positions a second, the profile table if `profile`) over args.steps steps
    after args.warmup, cycling through `batches`, on fresh random weights."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=args.seq_len, vocab_size=args.vocab)).to(device)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-5, weight_decay=0.0), device)
    step_model = torch.compile(model, **args.compile_kwargs) if args.compile else model
    seconds, positions = [], []

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective(step_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i, batch in zip(range(args.warmup + args.steps), itertools.cycle(batches)):
        start = time.perf_counter()
        step(batch)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
            positions.append(batch["input_ids"].numel())
    table = profile_table(lambda: step(batches[0]), device) if profile else ""
    return 1000 * statistics.median(seconds), sum(positions) / sum(seconds), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x8", choices=list(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=256, help="pairs a step (dpo.batch_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated, of "
                        f"{', '.join(OBJECTIVES)}; the last is the one the others are compared with")
    add_regions_flag(parser)
    parser.add_argument("--data", type=Path, default=Path("artifacts/data/dpo.jsonl"))
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/sft"), help="a checkpoint with the tokenizer")
    args = parser.parse_args()
    labels = args.objectives.split(",")
    if set(labels) - set(OBJECTIVES):
        parser.error(f"--objectives: {', '.join(sorted(set(labels) - set(OBJECTIVES)))} is not one of "
                     f"{', '.join(OBJECTIVES)}")
    args.compile_kwargs = regions_compile_kwargs(parser, args)
    device = torch.device(args.device)
    tok = load_tokenizer(args.tokenizer)
    args.vocab = tok.get_vocab_size()
    pairs = encode_pairs(tok, list(read_jsonl(args.data, validate_preference)))
    zeros = torch.zeros(len(pairs), 2)  # the reference log-probs do not change the step's cost
    stream = PreferenceBatches(pairs, zeros, args.pairs, args.seq_len, seed=0, pad_id=special_id(tok, ENDOFTEXT))
    batches = [{k: v.to(device) for k, v in b.items() if k != "padding"}
               for b, _ in zip(stream, range(len(pairs) // args.pairs))]
    for batch in batches:  # the row count varies: one graph for all, whichever objective runs first
        for key in ("input_ids", "labels", "segments"):
            torch._dynamo.maybe_mark_dynamic(batch[key], 0)
    rows = statistics.mean(b["input_ids"].shape[0] for b in batches)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.model} on {name}, bf16, {'compiled' if args.compile else 'eager'}"
          f"{', nested layer regions' if args.regions else ''}; {args.pairs} pairs a step "
          f"from {args.data} packed into {rows:.1f} rows of {args.seq_len} on average ({len(batches)} batches)\n")
    print(f"| objective | ms a step | positions/s | vs {labels[-1]} |")
    print("|---|---|---|---|")
    results = {label: time_steps(OBJECTIVES[label], batches, args, device, profile=args.profile and label == "dpo")
               for label in labels}
    for label, (ms, rate, _) in results.items():
        print(f"| {label} | {ms:.1f} | {rate:,.0f} | {rate / results[labels[-1]][1]:.0%} |")
    if args.profile and "dpo" in results:
        print(f"\nTop kernels in one dpo step:\n{results['dpo'][2]}")


if __name__ == "__main__":
    main()
