"""Stage sft: full fine-tuning of the pretrained model on single- and multi-turn chats → artifacts/sft/."""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.logging import LiveLogger
from tinyllm.train.sft import run_sft


@stage_main
def main(params):
    logger = LiveLogger(Path("reports/live/sft"))
    data = Path("artifacts/data")
    summary = run_sft(params, Path("artifacts/pretrain"), [data / "sft_single.jsonl", data / "sft_multi.jsonl"],
                      Path("artifacts/tokens"), Path("artifacts/sft"), logger)
    logger.close()
    write_json(Path("reports/metrics/sft.json"), summary)


if __name__ == "__main__":
    main()
