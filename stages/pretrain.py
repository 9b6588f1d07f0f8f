"""Stage pretrain: train from scratch on the token shards → artifacts/pretrain/ (safetensors)."""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.logging import LiveLogger
from tinyllm.train.pretrain import run_pretrain


@stage_main
def main(params):
    logger = LiveLogger(Path("reports/live/pretrain"))
    summary = run_pretrain(params, Path("artifacts/tokens"), Path("artifacts/tokenizer"),
                           Path("artifacts/pretrain"), logger)
    logger.close()
    write_json(Path("reports/metrics/pretrain.json"), summary)


if __name__ == "__main__":
    main()
