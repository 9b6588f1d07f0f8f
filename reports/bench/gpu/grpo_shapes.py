"""GRPO's step at one shape against rollouts of changing shapes, through the stage's own `run_grpo`.

    python reports/bench/gpu/grpo_shapes.py --graphs auto    # rollouts padded to one width, the step replayed
    python reports/bench/gpu/grpo_shapes.py --graphs false   # each micro-batch as long as its longest row
    python reports/bench/gpu/grpo_shapes.py --device cpu --preset tiny --steps 4   # a smoke test (no graphs)

Where the step can replay CUDA graphs, `run_grpo` pads every rollout to the longest prompt plus
`grpo.max_new_tokens` and compiles the step for that shape (`RolloutBatches`' fixed width);
without graphs each micro-batch is padded to its own longest row and the step is compiled for any
shape. Which starts faster, and which trains faster? The model is the GPU preset's (768x8, seq
512) with random weights, saved as a checkpoint with the pipeline's tokenizer (`artifacts/grpo`);
the prompts are the pipeline's (`artifacts/data/grpo.jsonl`); everything else is params.yaml with
the preset over it. A random model almost never says <|im_end|>, so nearly every reply runs to the length
cap: the stage's longest rollouts. Run each setting in a fresh process with an empty compile cache
(`TORCHINDUCTOR_CACHE_DIR`); `grpo_shapes_call.sh` does. Not part of CI.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from tinyllm.bench import PRESETS as MODELS
from tinyllm.config import ModelConfig, parse_params
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.model.transformer import Transformer
from tinyllm.presets import PRESETS, with_values
from tinyllm.train.checkpoint import save_checkpoint
from tinyllm.train.grpo import run_grpo

TOKENIZER = Path("artifacts/grpo")
PROMPTS = Path("artifacts/data/grpo.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", choices=["auto", "false"], default="auto", help="runtime.cuda_graphs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="768x8", help="the model (tinyllm.bench.PRESETS)")
    parser.add_argument("--steps", type=int, default=30, help="grpo.max_steps")
    args = parser.parse_args()
    graphs = "auto" if args.graphs == "auto" else False
    raw = with_values(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")), {
        **PRESETS["gpu"], "runtime.device": args.device, "runtime.cuda_graphs": graphs,
        "grpo.max_steps": args.steps, "grpo.log_interval": max(1, args.steps // 6)})
    params = parse_params(raw, "params.yaml with the gpu preset")
    cfg = ModelConfig(**MODELS[args.preset], max_seq_len=params.model.max_seq_len,
                      vocab_size=load_tokenizer(TOKENIZER).get_vocab_size())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        init = Path(folder) / "dpo"
        save_checkpoint(Transformer(cfg), init, meta={"stage": "dpo"}, tokenizer_dir=TOKENIZER)
        final = run_grpo(params, init, PROMPTS, Path(folder) / "grpo")
    card = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"| {args.preset}, {args.steps} steps | {args.graphs} (replayed: {final['cuda_graphs']}) | "
          f"{final['startup_seconds']:.1f} | {final.get('compile_seconds', 0):.1f} | "
          f"{final['first_step_seconds']:.1f} | {final['tokens_per_sec']:,.0f} | {final['padding_share']:.0%} | "
          f"{final['recompiles']} | {final['train/rollout_tokens_per_sec']:,.0f} | {final['train_seconds']:.1f} | "
          f"{card} |")


if __name__ == "__main__":
    main()
