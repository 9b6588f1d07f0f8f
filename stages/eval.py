"""Stage eval: perplexity, fact accuracy, report and plots → reports/eval/."""

from pathlib import Path

from tinyllm.eval.report import run_eval
from tinyllm.stage import stage_main


@stage_main
def main(params):
    run_eval(params, ckpt_dir=Path("artifacts/pretrain"), token_dir=Path("artifacts/tokens"),
             facts=Path("artifacts/data/eval_facts.jsonl"), live_dir=Path("reports/live/pretrain"),
             out_dir=Path("reports/eval"))


if __name__ == "__main__":
    main()
