"""Where eval's seconds go on a GPU: one chat checkpoint scored as the eval stage scores it
(`evaluate_checkpoint`), three times (the first compiles the decode step), the third under
torch's profiler. In the recipe each of five checkpoints took about 5.8 s on an H100, while a
decode step alone runs 64 rows at about 0.9 ms (decode_capture/decode.txt): is the rest launches,
syncs, the eager prompt pass, or the host?

    python reports/bench/gpu/eval_profile.py                     # 768x8, random weights, on the GPU
    python reports/bench/gpu/eval_profile.py --model tiny --device cpu    # a smoke test

Random weights of a preset (fp32, as eval loads a checkpoint) with this run's tokenizer and eval
sets (artifacts/tokenizer, artifacts/data, artifacts/tokens from the default `dvc repro`): their
replies never stop early, so each set decodes its whole budget, as a pretrained model's fact
completions do. Prints each run's parts and the profiler's tables. Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig, load_params
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.eval.report import evaluate_checkpoint
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="768x8", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # evaluate_checkpoint logs its parts
    params = load_params()
    params = dataclasses.replace(params, runtime=dataclasses.replace(params.runtime, device=args.device))
    vocab = load_tokenizer(Path("artifacts/tokenizer")).get_vocab_size()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=params.model.max_seq_len, vocab_size=vocab))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        save_checkpoint(model, ckpt, meta={"stage": "sft"}, tokenizer_dir=Path("artifacts/tokenizer"))
        score = lambda: evaluate_checkpoint(params, ckpt, Path("artifacts/tokens"), Path("artifacts/data"))  # noqa: E731
        for run in range(2):
            start = time.perf_counter()
            score()
            print(f"run {run + 1}: {time.perf_counter() - start:.2f} s", flush=True)
        cuda = torch.cuda.is_available() and args.device != "cpu"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            score()
    averages = prof.key_averages()
    for key in ("cpu_time_total", "self_cpu_time_total") + (("self_cuda_time_total",) if cuda else ()):
        print(f"\n## by {key}\n")
        print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
