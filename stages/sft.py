"""Stage sft: full fine-tuning of the pretrained model on single- and multi-turn chats → artifacts/sft/.

Several processes: `distributed.nproc` in params (or `torchrun --nproc_per_node N -m stages.sft`).
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.distributed import training_run
from tinyllm.train.sft import run_sft


@stage_main
def main(params):
    chats = Path("artifacts/chat_tokens")
    with training_run("sft", params) as run:
        summary = run_sft(params, Path("artifacts/pretrain"), [chats / "sft_single", chats / "sft_multi"],
                          Path("artifacts/tokens"), Path("artifacts/sft"), run,
                          val_chats=[chats / "heldout_single", chats / "heldout_multi"])
        if run.dist.is_main:
            write_json(Path("reports/metrics/sft.json"), summary)


if __name__ == "__main__":
    main()
