"""Does one request's decode step depend on the batch around it? (issue 20: greedy replies alone and
among 31 others on a GPU.)

    python reports/bench/serving/bucket_check.py --model 768x8 --device cuda

Random weights of a preset, the dtype the server uses there (bf16 on a GPU). 32 slots of the
serving KV cache are prefilled alone, each with its own prompt; then one decode forward runs over
the first n slots for every decode bucket n, eagerly and compiled as the batcher compiles its
forward (torch.compile, static shapes; the CUDA-graph capture around it is not part of this). It
prints, per path:
- for slot 0, the largest difference of its logits between bucket n and bucket 1 (0 means the
  batch size does not touch its numbers), and
- with every slot holding the same prompt, the largest difference between any row and row 0 of one
  forward (0 means a row's place in the batch does not either).
"""

from __future__ import annotations

import argparse

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig
from tinyllm.infer.batcher import _buckets
from tinyllm.infer.slots import SlotKVCache
from tinyllm.model.transformer import Transformer

SLOTS = 32


def prefilled(model, prompts: list[list[int]]) -> SlotKVCache:
    """A cache whose slot i holds prompts[i], each prefilled alone."""
    param = next(model.parameters())
    cache = SlotKVCache(model.config, SLOTS, param.device, param.dtype)
    for slot, prompt in enumerate(prompts):
        rows = torch.tensor([slot], device=param.device)
        model(torch.tensor([prompt], device=param.device), cache=cache.prefill(rows, torch.zeros_like(rows)))
        cache.positions[slot] = len(prompt)
    return cache  # no slot is live: a decode forward leaves the positions where they are


def decode_logits(forward, cache: SlotKVCache, last: torch.Tensor, n: int) -> torch.Tensor:
    return forward(last[:n, None], cache.decode(n)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(PRESETS), default="768x8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], max_seq_len=256, vocab_size=args.vocab))
    model = model.to(device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (int(length),), generator=gen).tolist()
               for length in torch.randint(8, 120, (SLOTS,), generator=gen)]
    last = torch.randint(0, args.vocab, (SLOTS,), generator=gen).to(device)

    def eager(ids, view):
        return model(ids, cache=view).logits[:, -1]

    paths = {"eager": eager}
    if device.type == "cuda":
        paths["compiled"] = torch.compile(eager, fullgraph=True, dynamic=False)
        torch._dynamo.config.recompile_limit = 64
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, {dtype}, {name}; slot 0's logits at bucket n against bucket 1 (max |diff|), "
          "and rows of one bucket-32 forward over 32 copies of one prompt against row 0")
    with torch.no_grad():
        different = prefilled(model, prompts)
        same = prefilled(model, [prompts[0]] * SLOTS)
        for path, forward in paths.items():
            alone = decode_logits(forward, different, last, 1)[0]
            for n in _buckets(SLOTS)[1:]:
                row = decode_logits(forward, different, last, n)[0]
                print(f"{path:9s} bucket {n:2d}: slot 0 differs by {(row - alone).abs().max().item():.3g}, "
                      f"same argmax: {bool(row.argmax() == alone.argmax())}")
            rows = decode_logits(forward, same, last[:1].expand(SLOTS), SLOTS)
            print(f"{path:9s} bucket 32, one prompt in every slot: rows differ from row 0 by at most "
                  f"{(rows - rows[0]).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
