"""Stage export: the newest chat model (grpo, else dpo, else lora, else sft) as a Hugging Face transformers folder
→ artifacts/hf/ (LlamaForCausalLM, or Qwen2MoeForCausalLM for an MoE; model card with eval metrics)."""

import json
import shutil
import sys
from pathlib import Path

from tinyllm.errors import UserError
from tinyllm.export import export_hf
from tinyllm.infer.chat import newest_chat_checkpoint
from tinyllm.stage import stage_main
from tinyllm.train.checkpoint import read_config

OUT = Path("artifacts/hf")


@stage_main
def main(params):
    checkpoint = newest_chat_checkpoint(Path("artifacts"))
    metrics = json.loads(Path("reports/eval/metrics.json").read_text()).get(read_config(checkpoint)["stage"])
    try:
        export_hf(checkpoint, OUT, metrics=metrics)
    except UserError as err:  # e.g. sigmoid MoE routing: no exact stock architecture; the pipeline still ends
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        (OUT / "NOT_EXPORTED").write_text(f"{err}\n")
        print(f"warning: not exported: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
