"""Stage dpo: preference optimisation of the chat model against its frozen self → artifacts/dpo/.

It starts from the SFT model with the LoRA identity adapter merged in (artifacts/lora), or from
the SFT model itself when lora.enabled is false: pretrain → sft → (lora) → dpo, one chain.
Several processes: `distributed.nproc` in params (or `torchrun --nproc_per_node N -m stages.dpo`).
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.checkpoint import is_checkpoint
from tinyllm.train.distributed import training_run
from tinyllm.train.dpo import run_dpo


def train(params, init: Path, out: Path, run=None) -> dict:
    """The stage's training from `init` to `out` (also what stages/compile_ahead.py compiles ahead)."""
    return run_dpo(params, init, Path("artifacts/data/dpo.jsonl"), out, run)


@stage_main
def main(params):
    init = Path("artifacts/lora") if is_checkpoint(Path("artifacts/lora")) else Path("artifacts/sft")
    with training_run("dpo", params) as run:
        summary = train(params, init, Path("artifacts/dpo"), run)
        if run.dist.is_main:
            write_json(Path("reports/metrics/dpo.json"), summary)


if __name__ == "__main__":
    main()
