"""Batched generation's decode step: compiled with CUDA-graph trees as it is
(`generate._static_decoder`, `torch.compile(mode="reduce-overhead")`), or captured as a CUDA graph
without compiling (`captured_decoder` below, tried on 2026-12-06 and not kept). Compiling takes
10-15 s of an eval's first checkpoint and of GRPO's first rollout (reports/gpu_speed.md); what
would leaving it out cost per token?

    python reports/bench/gpu/decode_capture.py                      # 768x8, bf16, on the GPU
    python reports/bench/gpu/decode_capture.py --model tiny --rows 1,4 --new-tokens 8 --device cpu  # a smoke test

Random weights of a preset, random prompts of 20-40 tokens, greedy, no stop token (every row
decodes all its tokens). Per way and batch size: the first call's seconds (capturing or compiling,
then the call itself) and the steady tokens/s (new tokens of all rows over the median of 3 more
calls); then how many rows of greedy replies the two ways agree on (bf16 kernels of the two ways
differ in their last bits, so a near-tie can part them). On the CPU nothing is captured or
compiled: both ways are the eager step, and the smoke test checks the script only. Not part of CI.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tinyllm.bench import PRESETS
from tinyllm.config import ModelConfig
from tinyllm.infer import generate
from tinyllm.infer.batcher import capture_graph
from tinyllm.infer.generate import generate_batch
from tinyllm.model.transformer import StaticKVCache, Transformer


def captured_decoder(model, batch_size, device, dtype):
    """The same step as the library's, captured as a CUDA graph without compiling: the graph's
    inputs are buffers refilled for each token (`key_valid` None means all keys valid)."""
    cache = StaticKVCache(model.config, batch_size, model.config.max_seq_len, device, dtype)

    def step(inputs, key_valid):
        return model(inputs, cache=cache, key_valid=key_valid).logits[:, -1]

    if device.type != "cuda":
        return cache, lambda inputs, key_valid: step(inputs, key_valid).clone()
    tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    valid = torch.ones(batch_size, cache.max_len, dtype=torch.bool, device=device)
    replay, _ = capture_graph(lambda: step(tokens, valid), device)
    cache.reset()  # warming up and capturing wrote a few positions

    def run(inputs, key_valid):
        if inputs.shape[1] != 1:
            return step(inputs, key_valid).clone()
        tokens.copy_(inputs)
        valid.copy_(key_valid) if key_valid is not None else valid.fill_(True)
        return replay().clone()

    return cache, run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, float, list]:
    """(first call's seconds, steady tokens/s, the replies)."""
    start = time.perf_counter()
    replies = generate_batch(model, prompts, new_tokens, static=True)
    sync(device)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        generate_batch(model, prompts, new_tokens, static=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return first, len(prompts) * new_tokens / statistics.median(seconds), replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x8", choices=list(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="1,64,128", help="comma list of batch sizes (eval: 64, GRPO: 128)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=6400)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.model], vocab_size=args.vocab_size, max_seq_len=512))
    model = model.to(device=device, dtype=dtype).eval()
    rng = random.Random(0)
    generate_batch(model, [[1, 2, 3]], 2, static=False)  # CUDA, cuBLAS and the allocator start here
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# Decode step captured against compiled: {args.model}, {dtype}, {name}, torch {torch.__version__}, "
          f"{args.new_tokens} new tokens a row, greedy\n")
    print("| rows | captured: first call (s) | compiled: first call (s) | captured tokens/s | compiled tokens/s "
          "| captured / compiled | greedy replies alike |")
    print("|---|---|---|---|---|---|---|")
    library_decoder = generate._static_decoder
    for rows in [int(r) for r in args.rows.split(",")]:
        prompts = [[rng.randrange(3, args.vocab_size) for _ in range(rng.randint(20, 40))] for _ in range(rows)]
        results = {}
        for way, decoder in (("captured", captured_decoder), ("compiled", library_decoder)):
            generate._STATIC.clear()  # a fresh decoder for each way
            generate._static_decoder = decoder
            results[way] = measure(model, prompts, args.new_tokens, device)
        generate._static_decoder = library_decoder
        (first_a, rate_a, replies_a), (first_b, rate_b, replies_b) = results["captured"], results["compiled"]
        alike = sum(a == b for a, b in zip(replies_a, replies_b))
        print(f"| {rows} | {first_a:.2f} | {first_b:.2f} | {rate_a:,.0f} | {rate_b:,.0f} | {rate_a / rate_b:.2f} "
              f"| {alike}/{rows} |", flush=True)


if __name__ == "__main__":
    main()
