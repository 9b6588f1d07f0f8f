"""How long compiling takes, whole model against one decoder layer at a time (issue 22: a training
stage's start-up must stay under 30 s; a cold `torch.compile` of 768×8 cost 25–45 s of it).

    python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 --batch-size 32
    python reports/bench/gpu/compile_scope.py --model tiny --device cpu --seq-len 128 --batch-size 16
    python reports/bench/gpu/compile_scope.py --model 768x8 --device cuda --seq-len 512 --batch-size 32 \
        --scopes whole,regional --cuda-graphs       # every compiled function replayed as CUDA graphs

Each scope runs in a fresh process with an empty inductor cache, so every compile is cold:
- eager: no compiling;
- whole: `torch.compile(model)`, as the training engine compiles it, tracing every layer;
- layers: `layer.compile()` on each decoder layer. The layers share their code, so Dynamo traces
  one graph for all of them; the embedding, the final norm, the head and the loss stay eager.
- nested: the whole model, each decoder layer's forward a nested compile region
  (`torch.compiler.nested_compile_region`, `regions.py`), so Dynamo and Inductor compile one layer
  and stamp it out for the others, inside one whole-model graph (head and loss included).
- regional: the layers as above, and the final norm, the head and the loss compiled as one more
  function (the model's training forward written out here, so the two parts compile apart). Is
  the layers' slower step the eager fp32 loss over the 6,400-wide logits, or the layers' edges?
It prints the first step (compile included) and the median step after it, bf16 autocast (or
`--dtype float32`), AdamW, and how far the first step's gradients are from the eager model's (the
largest relative norm of the difference over the parameters: bf16 rounding gives about 1e-2; a
wrong gradient, about 1 or more).
Nested regions need buffer reuse off on torch 2.13: with it their gradients are wrong
(`regions.py`, `nested_region_grad_bug.py`; reports/gpu_speed.md, 2026-12-06).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

SCOPES = ("eager", "whole", "nested", "layers", "regional")


def head_loss(model, x, labels):
    """The final norm, the head and the mean next-token loss, as the model's forward computes them."""
    import torch.nn.functional as F

    logits = model.lm_head(model.model.norm(x))
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def run_scope(scope: str, args: argparse.Namespace) -> dict:
    import torch
    from regions import nest_decoder_layers  # this folder's module, beside this script

    from tinyllm.bench import PRESETS
    from tinyllm.config import ModelConfig
    from tinyllm.model.transformer import DecoderLayer, Transformer

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=args.seq_len, vocab_size=args.vocab_size))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reference = copy.deepcopy(model)  # eager, for the first step's gradients
    graphs = {"options": {"triton.cudagraphs": True}} if args.cuda_graphs else {}
    step_model = model
    if scope == "whole":
        step_model = torch.compile(model, **graphs)
    elif scope == "nested":
        nested = nest_decoder_layers()
        step_model = torch.compile(model, options={**nested["options"], **graphs.get("options", {})})
    if scope in ("layers", "regional"):
        for layer in (m for m in model.modules() if isinstance(m, DecoderLayer)):
            layer.compile(**graphs)
    if scope == "regional":
        head = torch.compile(head_loss, **graphs)

        def step_model(ids, labels):
            x = model.model.embed_tokens(ids)
            cos, sin = model.rope_cos[:ids.shape[1]], model.rope_sin[:ids.shape[1]]
            for layer in model.model.layers:
                x, _ = layer(x, cos, sin)
            return SimpleNamespace(loss=head(model, x, labels))
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    dtype = getattr(torch, args.dtype)
    seconds, first_grads = [], None
    for _ in range(args.steps):
        start = time.perf_counter()
        if args.cuda_graphs:  # a new step: the last replay's outputs may be overwritten (as the engine marks it)
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step_model(x, labels=x).loss
        loss.backward()
        first_grads = first_grads or [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    from torch._dynamo.utils import counters

    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        reference(x, labels=x).loss.backward()
    grad_error = max(float((g - r.grad).norm() / r.grad.norm()) for g, r in zip(first_grads, reference.parameters()))
    return {"first_step_s": seconds[0], "step_ms": 1000 * statistics.median(seconds[1:]),
            "graphs": counters["stats"]["unique_graphs"], "loss": float(loss), "grad_error": grad_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="autocast dtype")
    parser.add_argument("--cuda-graphs", action="store_true", help="every compiled function replays as CUDA graphs "
                        "(`runtime.cuda_graphs`): do the regions' steps then lose less to the host between them?")
    parser.add_argument("--scope", choices=SCOPES, help="run this one scope here and print its JSON")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated: the scopes to compare")
    args = parser.parse_args()
    if args.scope:
        print(json.dumps(run_scope(args.scope, args)))
        return
    print(f"| {args.model}, {args.device}, {args.batch_size} × {args.seq_len}, {args.dtype}"
          f"{', CUDA graphs' if args.cuda_graphs else ''} | first step (s) | "
          "step after it (ms) | graphs | loss | gradient error |")
    print("|---|---|---|---|---|---|")
    for scope in args.scopes.split(","):
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: nothing from an earlier run
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--scope", scope], env=env,
                                 capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {scope} | {result['first_step_s']:.1f} | {result['step_ms']:.1f} | {result['graphs']} | "
              f"{result['loss']:.4f} | {result['grad_error']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
