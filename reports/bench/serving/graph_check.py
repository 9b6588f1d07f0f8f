"""How far a GPU's batched, CUDA-graph decoding strays from decoding alone (issue 20: "on a GPU state
the tolerance you measure and why").

    python reports/bench/serving/graph_check.py artifacts/grpo --model 768x8 --device cuda

For 32 mixed requests (greedy and seeded sampling, prompts of different lengths) it counts how
many replies are token for token the same
- alone and among the other 31, on the CUDA-graph path,
- alone twice, and among 32 twice (is the path deterministic at all?),
- on the CUDA-graph path and on the eager path (same batches; since 2026-12-05 the eager path
  prefills each prompt alone in bf16 too, as the graph path does, so this line no longer compares
  the two prefills as the earlier H200 files did),
- with 8 tokens per graph launch and with 1 (same batches; should be identical),
(`--one-bucket`: the graph batcher decodes every step over all 32 slots; the eager and the
one-token batchers keep their buckets),
and, for the first position where a greedy reply differs, the gap between the two best logits
there (a near tie that bf16 rounding can flip).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import torch

from tinyllm.bench import PRESETS, _random_checkpoint
from tinyllm.infer.batcher import Batcher, Request
from tinyllm.serve.loadgen import QUESTIONS
from tinyllm.serve.models import load_served_models


def replies(batcher: Batcher, requests: list[dict], together: bool) -> list[list[int]]:
    """Token ids of each reply (submitted all at once, or one after another)."""
    out = [[] for _ in requests]

    def run(indices):
        done = [threading.Event() for _ in indices]
        made = []
        for i, event in zip(indices, done):
            def emit(kind, value, i=i, event=event):  # logprobs=0 hands over each token's id
                if kind == "text":
                    out[i] += [entry.token for entry in value.logprobs]
                else:
                    event.set()
            made.append(Request(emit=emit, logprobs=0, **requests[i]))
        batcher.submit(*made)
        for event in done:
            event.wait(600)

    if together:
        run(range(len(requests)))
    else:
        for i in range(len(requests)):
            run([i])
    return out


def served_model(checkpoint: Path, preset: str | None, device: str, dtype: str = "auto"):
    """(served model entry, model, UTF-8 guard): the checkpoint, or random weights of `preset` with
    its tokenizer, loaded as the server loads it (`tinyllm serve --dtype`)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = _random_checkpoint(preset, checkpoint, Path(tmp)) if preset else checkpoint
        served = load_served_models([str(target)])[0]
        return (served, *served.load(device, dtype))


def mixed_requests(tok, max_tokens: int) -> list[dict]:
    """32 requests, prompts of different lengths, even ones greedy, odd ones seeded at 0.8, each
    generating exactly max_tokens."""
    return [{"prompt_ids": tok.encode(q + f"（第{i}题）" * (1 + i % 3)).ids, "max_tokens": max_tokens,
             "ignore_eos": True, **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i})}
            for i, q in enumerate(QUESTIONS * 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", choices=list(PRESETS), default=None, help="random weights of this shape instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--one-bucket", action="store_true", help="decode every step over all 32 slots")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the weights' (auto: bf16 on a GPU, fp32 on a CPU, as the server)")
    args = parser.parse_args()
    served, model, utf8 = served_model(args.checkpoint, args.model, args.device, args.dtype)
    requests = mixed_requests(served.tok, args.max_tokens)
    graph = Batcher(model, served.tok, served.stop_ids, utf8, compile=args.device.startswith("cuda"))
    if args.one_bucket:
        graph.buckets = [graph.slots]
    graph.warm_up()
    eager = Batcher(model, served.tok, served.stop_ids, utf8, compile=False)
    single = Batcher(model, served.tok, served.stop_ids, utf8, compile=graph.compile, decode_steps=1)
    alone, together = replies(graph, requests, False), replies(graph, requests, True)
    alone_again, together_again = replies(graph, requests, False), replies(graph, requests, True)
    eager_together, single_together = replies(eager, requests, True), replies(single, requests, True)
    for batcher in (graph, eager, single):
        batcher.close()
    print(f"model {args.model or args.checkpoint}, {next(model.parameters()).dtype}, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    for name, a, b in (("graph alone vs graph among 32", alone, together),
                       ("graph alone, twice", alone, alone_again),
                       ("graph among 32, twice", together, together_again),
                       ("graph vs eager, among 32", together, eager_together),
                       (f"{graph.decode_steps} vs 1 tokens per launch, among 32", together, single_together)):
        same = sum(x == y for x, y in zip(a, b))
        first = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
        differing = [(i, j) for i, j in enumerate(first) if j is not None]
        greedy = sum(x == y for x, y, r in zip(a, b, requests) if r["temperature"] == 0)
        print(f"{name}: {same}/{len(a)} replies identical ({greedy} of the {len(a) // 2} greedy ones); "
              "first differing position per differing reply: "
              f"{[j for _, j in differing]}")
        for i, j in differing:
            if requests[i].get("temperature") == 0:
                ids = requests[i]["prompt_ids"] + a[i][:j]
                with torch.no_grad():
                    logits = model(torch.tensor([ids], device=args.device)).logits[0, -1].float()
                top2 = logits.topk(2).values
                print(f"  greedy request {i}: position {j}, top-2 logit gap {float(top2[0] - top2[1]):.4f} "
                      f"(logits ~{float(top2[0]):.2f})")


if __name__ == "__main__":
    main()
