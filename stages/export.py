"""Stage export: the newest chat model (grpo, else dpo, else lora, else sft) as a Hugging Face transformers folder
→ artifacts/hf/ (LlamaForCausalLM, or Qwen2MoeForCausalLM for an MoE; model card with eval metrics), and as a
GGUF file for llama.cpp and Ollama → artifacts/gguf/tinyllm.gguf (f16) with its Modelfile (dense models only)."""

import json
import shutil
import sys
from pathlib import Path

from tinyllm.errors import UserError
from tinyllm.export import export_hf
from tinyllm.export_gguf import export_gguf
from tinyllm.infer.chat import newest_chat_checkpoint
from tinyllm.stage import stage_main
from tinyllm.train.checkpoint import read_config

OUT = Path("artifacts/hf")
GGUF = Path("artifacts/gguf")


@stage_main
def main(params):
    checkpoint = newest_chat_checkpoint(Path("artifacts"))
    metrics = json.loads(Path("reports/eval/metrics.json").read_text()).get(read_config(checkpoint)["stage"])
    for out, export in ((OUT, lambda: export_hf(checkpoint, OUT, metrics=metrics)),
                        (GGUF, lambda: export_gguf(checkpoint, GGUF / "tinyllm.gguf"))):
        shutil.rmtree(out, ignore_errors=True)
        try:
            export()
        except UserError as err:  # e.g. an MoE in GGUF, sigmoid MoE routing in transformers; the pipeline still ends
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "NOT_EXPORTED").write_text(f"{err}\n")
            print(f"warning: {out} not exported: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
