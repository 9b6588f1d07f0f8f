"""Stage lora: peft adapters on the SFT model teaching the identity set → artifacts/lora/ (merged + adapter/).

Several processes: `distributed.nproc` in params (or `torchrun --nproc_per_node N -m stages.lora`).
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json, write_skipped
from tinyllm.train.distributed import training_run
from tinyllm.train.lora import run_lora

OUT = Path("artifacts/lora")


def train(params, init: Path, out: Path, run=None) -> dict:
    """The stage's training from `init` to `out` (also what stages/compile_ahead.py compiles ahead)."""
    chats = Path("artifacts/chat_tokens")
    return run_lora(params, init, chats / "identity", [chats / "sft_single", chats / "sft_multi"],
                    Path("artifacts/tokens"), out, run)


@stage_main
def main(params):
    with training_run("lora", params) as run:
        if not params.lora.enabled:
            write_skipped("lora", OUT, "lora.enabled is false in params.yaml", run)
            return
        summary = train(params, Path("artifacts/sft"), OUT, run)
        if run.dist.is_main:
            write_json(Path("reports/metrics/lora.json"), {"enabled": True, **summary})


if __name__ == "__main__":
    main()
