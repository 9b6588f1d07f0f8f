"""Stage eval: every stage's checkpoint scored side by side → reports/eval/ (metrics, report, plots)."""

from pathlib import Path

from tinyllm.eval.report import run_eval
from tinyllm.stage import stage_main


@stage_main
def main(params):
    stages = ("pretrain", "sft", "lora", "dpo", "grpo")
    run_eval(params, {stage: Path("artifacts") / stage for stage in stages},
             token_dir=Path("artifacts/tokens"), data_dir=Path("artifacts/data"),
             live_dir=Path("reports/live/pretrain"), out_dir=Path("reports/eval"))


if __name__ == "__main__":
    main()
