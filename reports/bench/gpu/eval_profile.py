"""Where eval's seconds go on a GPU: one chat checkpoint scored as the eval stage scores it
(`evaluate_checkpoint`), three times (the first compiles the decode step), the third under
torch's profiler. In the recipe each of five checkpoints took about 5.8 s on an H100, while a
decode step alone runs 64 rows at about 0.9 ms (decode_capture/decode.txt): is the rest launches,
syncs, the eager prompt pass, or the host?

    python reports/bench/gpu/eval_profile.py                     # 768x8, random weights, on the GPU
    python reports/bench/gpu/eval_profile.py --rows 0 --replies folded.json             # no profile: 3 runs
    python reports/bench/gpu/eval_profile.py --rows 0 --replies unfolded.json --unfolded  # SDPA's grouped heads
    python reports/bench/gpu/eval_profile.py --model tiny --device cpu    # a smoke test

Random weights of a preset (fp32, as eval loads a checkpoint) with this run's tokenizer and eval
sets (artifacts/tokenizer, artifacts/data, artifacts/tokens from the default `dvc repro`): their
replies never stop early, so each set decodes its whole budget, as a pretrained model's fact
completions do. `--max-seq-len` is the static cache's length, which every decode step attends
over: 512 as in the GPU preset (the runs in eval_profile_h100/ and eval_fold_h100/ had the
default params' 128, before the option). Prints each run's parts and the profiler's tables; the replies files of two
processes say how many replies two ways of decoding share. Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig, load_params
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.eval.report import evaluate_checkpoint
from tinyllm.model.transformer import StaticKVCache, Transformer
from tinyllm.train.checkpoint import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="768x8", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-seq-len", type=int, default=512, help="the model's (the GPU preset's: 512)")
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows (0: no profile)")
    parser.add_argument("--unfolded", action="store_true",
                        help="SDPA's grouped heads in the static decode step, as before 2026-12-07")
    parser.add_argument("--replies", help="write the last run's replies and completions to this JSON file")
    args = parser.parse_args()
    if args.unfolded:
        StaticKVCache.folded_dtypes = ()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # evaluate_checkpoint logs its parts
    params = load_params()
    params = dataclasses.replace(params, runtime=dataclasses.replace(params.runtime, device=args.device))
    vocab = load_tokenizer(Path("artifacts/tokenizer")).get_vocab_size()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=args.max_seq_len, vocab_size=vocab))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        save_checkpoint(model, ckpt, meta={"stage": "sft"}, tokenizer_dir=Path("artifacts/tokenizer"))
        score = functools.partial(evaluate_checkpoint, params, ckpt, Path("artifacts/tokens"), Path("artifacts/data"))
        for run in range(2 if args.rows else 3):
            start = time.perf_counter()
            _, rows = score()
            print(f"run {run + 1}: {time.perf_counter() - start:.2f} s", flush=True)
        if args.replies:
            texts = {name: [row.get("reply", row.get("output")) for row in set_rows]
                     for name, set_rows in rows.items() if isinstance(set_rows, list) and set_rows
                     and isinstance(set_rows[0], dict)}
            Path(args.replies).write_text(json.dumps(texts, ensure_ascii=False))
        if not args.rows:
            return
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
