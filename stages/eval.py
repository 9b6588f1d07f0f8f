"""Stage eval: every stage's checkpoint scored side by side → reports/eval/ (metrics, report, plots)."""

from pathlib import Path

from tinyllm.eval.metrics import GENERATION_ROWS
from tinyllm.eval.report import run_eval
from tinyllm.infer.generate import decodes_static, generate_batch
from tinyllm.stage import stage_main
from tinyllm.train.checkpoint import load_model
from tinyllm.train.runtime import resolve_device


@stage_main
def main(params):
    stages = ("pretrain", "sft", "lora", "dpo", "grpo")
    run_eval(params, {stage: Path("artifacts") / stage for stage in stages},
             token_dir=Path("artifacts/tokens"), data_dir=Path("artifacts/data"),
             live_dir=Path("reports/live/pretrain"), out_dir=Path("reports/eval"))


def compile_decode_step(params, init: Path) -> None:
    """Eval's one compiled graph, the decode step at `GENERATION_ROWS` rows that every reply goes
    through where decoding is static (a dense model on a GPU), compiled from the random checkpoint
    `init` into the compile cache while pretraining runs (stages/compile_ahead.py)."""
    model = load_model(init, resolve_device(params.runtime))
    if decodes_static(model, None):
        generate_batch(model, [[0]], max_new_tokens=2, pad_to_rows=GENERATION_ROWS)


if __name__ == "__main__":
    main()
