"""Is a device gap in the quality metrics the training's or the eval's? (issue 18: English held-out QA
is 7 points lower over 18 H200 runs than over 6 CPU runs, reports/quality.md.)

    python reports/bench/seeds/cross_eval.py artifacts/sft --device cuda --dtype bfloat16 float32

Scores one checkpoint (trained anywhere) with the eval stage's code on this machine, once per
dtype, and prints its quality metrics side by side. Run it on a CPU-trained checkpoint on the GPU
(and the other way round): if the numbers move with the device, the eval path is the cause.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tinyllm.config import load_params
from tinyllm.eval.report import evaluate_checkpoint

KEYS = ("qa_heldout", "qa_heldout_zh", "qa_heldout_en", "qa_seen", "multi_turn", "facts", "heldout_loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", nargs="+", default=["auto"])
    parser.add_argument("--data", type=Path, default=Path("artifacts/data"), help="the run's prepared data")
    parser.add_argument("--tokens", type=Path, default=Path("artifacts/tokens"))
    args = parser.parse_args()
    params = load_params("params.yaml")
    print(f"| {args.checkpoint} on {args.device} | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for dtype in args.dtype:
        runtime = dataclasses.replace(params.runtime, device=args.device, dtype=dtype)
        metrics, _ = evaluate_checkpoint(dataclasses.replace(params, runtime=runtime), args.checkpoint,
                                         args.tokens, args.data)
        print(f"| {dtype} | " + " | ".join(f"{metrics[k]:.3f}" for k in KEYS) + " |", flush=True)


if __name__ == "__main__":
    main()
