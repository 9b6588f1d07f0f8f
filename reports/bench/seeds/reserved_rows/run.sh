#!/bin/bash
# Paired: the trained tokenizer's rows vs the same model plus untrained rows to 2,048 (patch.txt applied
# in a worktree of 756428d at /tmp/rows_ab/wt; each seed's data made once, both variants pretrained on it).
cd /tmp/rows_ab/wt
. /work/main/.venv/bin/activate
cp /work/main/params.yaml params.yaml.orig
for seed in 1337 1 2; do
  python - "$seed" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml.orig")); p["seed"] = int(sys.argv[1])
yaml.safe_dump(p, open("params.yaml", "w"), allow_unicode=True, sort_keys=False)
PY
  for s in prepare train_tokenizer tokenize_corpus; do python -m stages.$s > /tmp/rows_ab/data_$seed.log 2>&1 || exit 1; done
  for variant in 0 2048; do
    start=$SECONDS
    PAD_ROWS=$variant python -m stages.pretrain > /tmp/rows_ab/pretrain_${seed}_$variant.log 2>&1 || { echo fail; exit 1; }
    python - "$seed" "$variant" $((SECONDS - start)) <<'PY'
import json, sys
from pathlib import Path
from tinyllm.config import load_params
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.eval.metrics import fact_accuracy
from tinyllm.train.checkpoint import load_model
params = load_params()
model = load_model(Path("artifacts/pretrain")); model.eval()
tok = load_tokenizer(Path("artifacts/pretrain"))
facts = [json.loads(l) for l in open("artifacts/data/eval/eval_facts.jsonl")]
detail, _ = fact_accuracy(model, tok, facts, params.eval.max_new_tokens, params.eval.max_fact_prompts, params.seed)
s = json.load(open("reports/metrics/pretrain.json"))
print(f"seed {sys.argv[1]} rows {model.config.vocab_size}: facts {detail['overall']:.3f} kept {s.get('kept_step')} "
      f"best val {s.get('val/best_loss')} ({sys.argv[3]} s)", flush=True)
PY
  done
done
