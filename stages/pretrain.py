"""Stage pretrain: train from scratch on the token shards → artifacts/pretrain/ (safetensors)."""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.distributed import close_distributed, init_distributed
from tinyllm.train.logging import LiveLogger
from tinyllm.train.pretrain import run_pretrain


@stage_main
def main(params):
    dist = init_distributed()  # several processes under `torchrun --nproc_per_node N -m stages.pretrain`
    logger = LiveLogger(Path("reports/live/pretrain")) if dist.is_main else None
    summary = run_pretrain(params, Path("artifacts/tokens"), Path("artifacts/tokenizer"),
                           Path("artifacts/pretrain"), logger, dist)
    if dist.is_main:
        logger.close()
        write_json(Path("reports/metrics/pretrain.json"), summary)
    close_distributed()


if __name__ == "__main__":
    main()
