"""The `tinyllm` command. Training runs through `dvc repro`; this holds the tools around it.

    tinyllm bench train --models 768x8 --compile off,on --dtype bfloat16
    python -m tinyllm.cli bench train ...     # same, where the package is not installed
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tinyllm import bench


def _bool_list(text: str) -> list[bool]:
    values = {"on": True, "off": False, "true": True, "false": False}
    try:
        return [values[v.strip().lower()] for v in text.split(",")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a comma list of on/off, got {text!r}") from None


def _models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in bench.PRESETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model preset(s) {unknown}; known: {', '.join(bench.PRESETS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser = sub.add_parser("bench", help="throughput benchmarks")
    bench_sub = bench_parser.add_subparsers(dest="what", required=True)
    train = bench_sub.add_parser("train", help="training tokens/s, MFU and memory of model presets",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--models", type=_models, default=["tiny"], help=f"comma list of {', '.join(bench.PRESETS)}")
    train.add_argument("--compile", type=_bool_list, default=[False], help="comma list of on/off")
    train.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    train.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    train.add_argument("--vocab-size", type=int, default=6400, help="embedding rows")
    train.add_argument("--steps", type=int, default=30, help="timed steps")
    train.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="autocast dtype; auto is bf16 on CUDA")
    train.add_argument("--out", type=Path, default=Path("reports/bench"), help="folder for the table")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "bench" and args.what == "train":
        print(bench.run(args.models, args.compile, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
                        vocab_size=args.vocab_size, steps=args.steps, warmup=args.warmup, device=args.device,
                        dtype=args.dtype))


if __name__ == "__main__":
    main()
