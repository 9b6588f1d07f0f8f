"""Is one decode launch deterministic? (issue 20: on the H200 the same seeded requests sent alone
twice gave different replies, reports/serving.md.)

    python reports/bench/serving/replay_check.py artifacts/grpo --model 768x8 --device cuda

Random weights of a preset (bf16 on a GPU, as the server loads them). 32 requests, half greedy and
half seeded, run to the end; then every slot is marked live again, so a launch over all 32 slots
has real prompts and replies in its cache. From a snapshot of everything a launch reads and
writes (the KV cache, positions, last tokens, sampling state), it replays, --repeats times each:
- the whole decode launch (on a GPU: the captured CUDA graph, model compiled, sampling inside),
- the model's forward alone, eagerly,
- the sampler alone, on one fixed set of logits,
and prints how many replays differ from the first, bitwise. The first path that differs is where
to look. Then it replays the eager forward with every module's inputs and outputs recorded and
names the first module (in the order calls return, so the innermost first) whose output varies
while its inputs do not: the op to blame is in that module's own code. Last, batch invariance:
one request's state copied into every slot and decoded in one launch (do the other slots' logits
equal slot 0's?), and slot 0 decoded in a launch of one slot (the shape a lone request runs at).
(On the CPU the launch is eager and computes only the sampling options live requests ask for;
with the requests finished that is none, so there it checks the greedy path only. On a GPU the
captured launch always computes them all.)

Switches, to find the setting that makes the replays equal (one at a time, each its own run):
--deterministic (torch's deterministic algorithms, cuBLAS's fixed workspace), --blas cublas /
cublaslt (the matmul library torch calls: a decode step's matmuls have few rows, the shapes where
a library may split the inner sum across blocks), --sdpa math (attention without the fused
kernels, some of which split a long cache across blocks) or no-cudnn (every kernel but cuDNN's),
--no-inductor (the launch's CUDA graph holds the eager model: is it Inductor's kernels or the graph
that varies?), --inductor-deterministic (torch._inductor.config.deterministic), --cublas-workspace
(CUBLAS_WORKSPACE_CONFIG=:4096:8 alone: the cuBLAS part of --deterministic) and
--no-reduced-precision (when cuBLAS splits a sum, it keeps the partial sums in fp32 instead of
rounding them to bf16).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from graph_check import mixed_requests, replies, served_model  # this folder's script, beside this one

from tinyllm.bench import PRESETS
from tinyllm.infer.batcher import Batcher, _Options

STATE = ("last", "temperature", "top_p", "penalty", "top_k", "seed", "steps", "utf8_state", "seen")


def state(batcher: Batcher) -> list[torch.Tensor]:
    """Everything a decode launch reads and writes, each tensor with one row per slot."""
    cache = batcher.cache
    return [*(getattr(batcher, name) for name in STATE), *cache.keys, *cache.values, cache.positions, cache.live]


def snapshot(batcher: Batcher) -> list[torch.Tensor]:
    return [t.clone() for t in state(batcher)]


def restore(batcher: Batcher, saved: list[torch.Tensor]) -> None:
    for target, value in zip(state(batcher), saved):
        target.copy_(value)


def differing(outputs: list[tuple[torch.Tensor, ...]]) -> int:
    """Replays whose outputs are not bitwise equal to the first's."""
    first = outputs[0]
    return sum(any(not torch.equal(a, b) for a, b in zip(first, out)) for out in outputs[1:])


def module_calls(model, run) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
    """Every module call of one `run()`, in the order the calls return: (name, tensor inputs, tensor outputs).
    Inputs that are not tensors (the KV cache) are not compared: each replay restores them first."""
    calls = []

    def tensors(values) -> list[torch.Tensor]:
        return [v.detach().clone() for v in values if isinstance(v, torch.Tensor)]

    def recorder(name: str):
        def record(module, args, kwargs, output):
            calls.append((name, tensors([*args, *kwargs.values()]),
                          tensors(output if isinstance(output, tuple) else (output,))))
        return record

    handles = [module.register_forward_hook(recorder(name or "(the whole model)"), with_kwargs=True)
               for name, module in model.named_modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def first_varying_module(runs: list[list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]]) -> str:
    """The first call whose inputs are bitwise the same in a replay as in the first run but whose
    outputs are not, and in how many replays that happens."""
    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    for i, (name, inputs, outputs) in enumerate(runs[0]):
        varying = sum(same(inputs, other[i][1]) and not same(outputs, other[i][2]) for other in runs[1:])
        if varying:
            return f"{name} ({varying} of {len(runs) - 1} replays)"
    return "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a pipeline checkpoint (its tokenizer, or its weights)")
    parser.add_argument("--model", choices=list(PRESETS), default=None, help="random weights of this shape instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8")
    parser.add_argument("--blas", choices=["auto", "cublas", "cublaslt"], default="auto",
                        help="torch.backends.cuda.preferred_blas_library")
    parser.add_argument("--sdpa", choices=["auto", "math", "no-cudnn"], default="auto",
                        help="math: torch's reference attention only (no flash, memory-efficient or cuDNN kernel); "
                             "no-cudnn: all but cuDNN's")
    parser.add_argument("--inductor-deterministic", action="store_true", help="torch._inductor.config.deterministic")
    parser.add_argument("--cublas-workspace", action="store_true", help="CUBLAS_WORKSPACE_CONFIG=:4096:8")
    parser.add_argument("--no-reduced-precision", action="store_true",
                        help="torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False: "
                             "split sums keep fp32 partial sums")
    parser.add_argument("--no-inductor", action="store_true",
                        help="capture the decode launch without torch.compile (the eager model in the CUDA graph)")
    args = parser.parse_args()
    if args.no_inductor:
        torch.compile = lambda run, **_: run
    if args.sdpa != "auto":
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.sdpa == "math":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    if args.inductor_deterministic:
        import torch._inductor.config as inductor
        inductor.deterministic = True
    if args.deterministic or args.cublas_workspace:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when CUDA starts: not yet
    if args.no_reduced_precision:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    if args.blas != "auto":
        torch.backends.cuda.preferred_blas_library(args.blas)
    served, model, utf8 = served_model(args.checkpoint, args.model, args.device)
    batcher = Batcher(model, served.tok, served.stop_ids, utf8, compile=args.device.startswith("cuda"))
    batcher.warm_up()
    replies(batcher, mixed_requests(served.tok, 96), together=True)
    # the scheduler is idle from here on: this thread drives
    batcher.cache.live[:] = True
    saved = snapshot(batcher)
    rows = slice(0, batcher.slots)

    def replay(run) -> list[tuple[torch.Tensor, ...]]:
        outputs = []
        for _ in range(args.repeats):
            restore(batcher, saved)
            with torch.no_grad():
                out = run()
            outputs.append(tuple(t.clone() for t in (out if isinstance(out, tuple) else (out,))))
        return outputs

    launch = batcher._decoder(batcher.slots)
    with torch.no_grad():
        logits = model(batcher.last[:, None], cache=batcher.cache.decode(batcher.slots)).logits[:, -1].clone()
    paths = {
        f"whole launch ({batcher.decode_steps} tokens, {'CUDA graph' if batcher.compile else 'eager'})": launch,
        "model forward alone, eager": lambda: model(batcher.last[:, None],
                                                    cache=batcher.cache.decode(batcher.slots)).logits,
        "sampler alone, fixed logits": lambda: batcher._pick(logits, rows, _Options.ALL),
    }
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    switches = [f"deterministic: {args.deterministic}", f"blas: {args.blas}", f"sdpa: {args.sdpa}",
                f"inductor: {not args.no_inductor}",
                f"inductor deterministic: {args.inductor_deterministic}",
                f"cublas workspace: {args.cublas_workspace}", f"reduced precision: {not args.no_reduced_precision}"]
    print(f"model {args.model or args.checkpoint}, {next(model.parameters()).dtype}, {name}, "
          f"{args.repeats} replays from one state ({', '.join(switches)})")
    for path, run in paths.items():
        print(f"{path}: {differing(replay(run))} of {args.repeats - 1} replays differ from the first")
    forward = paths["model forward alone, eager"]
    runs = []
    for _ in range(args.repeats):
        restore(batcher, saved)
        with torch.no_grad():
            runs.append(module_calls(model, forward))
    print(f"first module whose output varies with the same inputs: {first_varying_module(runs)}")

    # Batch invariance: slot 0's request copied into every slot. Kernels whose rounding depends on
    # neither the row a request sits in nor the batch's shape give every row slot 0's logits, and
    # slot 0 the same logits when it decodes alone (the one-slot shape a lone request runs at).
    # Compared at the launch's first token: after a token differs, the rows' inputs differ too.
    restore(batcher, saved)
    for rows in state(batcher):  # (every slot is live already)
        rows[1:].copy_(rows[:1].expand_as(rows[1:]))
    copies = snapshot(batcher)
    with torch.no_grad():
        together = launch()[1][0].clone()  # (slots, vocab)
    differ = sum(not torch.equal(together[i], together[0]) for i in range(1, batcher.slots))
    gap = (together - together[:1]).abs().max().item()
    print(f"one request in all {batcher.slots} slots, one launch: the first token's logits of {differ} of "
          f"{batcher.slots - 1} other slots differ from slot 0's (by at most {gap:.3g})")
    restore(batcher, copies)
    with torch.no_grad():
        alone = batcher._decoder(1)()[1][0, 0].clone()
    gap = (alone - together[0]).abs().max().item()
    print(f"slot 0 decoding in a launch of 1 slot vs of {batcher.slots}: the first token's logits differ by at most "
          f"{gap:.3g}")
    batcher.close()


if __name__ == "__main__":
    main()
