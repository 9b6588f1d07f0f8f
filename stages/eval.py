"""Stage eval: every stage's checkpoint scored side by side → reports/eval/ (metrics, report, plots)."""

from pathlib import Path

from tinyllm.eval.report import evaluate_checkpoint, run_eval
from tinyllm.stage import stage_main

TOKENS, DATA = Path("artifacts/tokens"), Path("artifacts/data")


def score(params, checkpoint: Path) -> dict:
    """One checkpoint's metrics (what stages/compile_ahead.py runs to compile eval's decode step ahead)."""
    return evaluate_checkpoint(params, checkpoint, TOKENS, DATA)[0]


@stage_main
def main(params):
    stages = ("pretrain", "sft", "lora", "dpo", "grpo")
    run_eval(params, {stage: Path("artifacts") / stage for stage in stages}, token_dir=TOKENS, data_dir=DATA,
             live_dir=Path("reports/live/pretrain"), out_dir=Path("reports/eval"))


if __name__ == "__main__":
    main()
