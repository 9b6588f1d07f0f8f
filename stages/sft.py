"""Stage sft: full fine-tuning of the pretrained model on single- and multi-turn chats → artifacts/sft/.

Several processes: `torchrun --nproc_per_node N -m stages.sft`.
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.distributed import training_run
from tinyllm.train.sft import run_sft


@stage_main
def main(params):
    data = Path("artifacts/data")
    with training_run(Path("reports/live/sft")) as (dist, logger):
        summary = run_sft(params, Path("artifacts/pretrain"), [data / "sft_single.jsonl", data / "sft_multi.jsonl"],
                          Path("artifacts/tokens"), Path("artifacts/sft"), logger, dist)
        if dist.is_main:
            write_json(Path("reports/metrics/sft.json"), summary)


if __name__ == "__main__":
    main()
