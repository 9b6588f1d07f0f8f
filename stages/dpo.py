"""Stage dpo: preference optimisation of the chat model against its frozen self → artifacts/dpo/.

It starts from the SFT model with the LoRA identity adapter merged in (artifacts/lora), or from
the SFT model itself when lora.enabled is false: pretrain → sft → (lora) → dpo, one chain.
"""

from pathlib import Path

from tinyllm.stage import stage_main, write_json
from tinyllm.train.checkpoint import is_checkpoint
from tinyllm.train.dpo import run_dpo
from tinyllm.train.logging import LiveLogger


@stage_main
def main(params):
    logger = LiveLogger(Path("reports/live/dpo"))
    init = Path("artifacts/lora") if is_checkpoint(Path("artifacts/lora")) else Path("artifacts/sft")
    summary = run_dpo(params, init, Path("artifacts/data/dpo.jsonl"), Path("artifacts/dpo"), logger)
    logger.close()
    write_json(Path("reports/metrics/dpo.json"), summary)


if __name__ == "__main__":
    main()
