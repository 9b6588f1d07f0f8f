"""Stage sft: full fine-tuning of the pretrained model on single- and multi-turn chats → artifacts/sft/.

Several processes: `distributed.nproc` in params (or `torchrun --nproc_per_node N -m stages.sft`).
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.distributed import training_run
from tinyllm.train.sft import run_sft


@stage_main
def main(params):
    chat = Path("artifacts/data/chat")
    with training_run("sft", params) as run:
        summary = run_sft(params, Path("artifacts/pretrain"), [chat / "sft_single.jsonl", chat / "sft_multi.jsonl"],
                          Path("artifacts/tokens"), Path("artifacts/sft"), run,
                          val_files=[chat / "heldout_single.jsonl", chat / "heldout_multi.jsonl"])
        if run.dist.is_main:
            write_json(Path("reports/metrics/sft.json"), summary)


if __name__ == "__main__":
    main()
