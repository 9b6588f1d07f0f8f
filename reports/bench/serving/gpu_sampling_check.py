"""The batcher's sampling on a GPU (CUDA graphs): 32 requests alone and together → equal counts.

    python reports/bench/serving/gpu_sampling_check.py     # on a CUDA machine, after dvc repro

Half the requests are greedy, half seeded samples at temperature 1 (every other one with top-p
0.95). Then one sampled prompt under 32 seeds, to see that the draws vary. Not part of CI; the
H200 output is reports/serving/gpu_sampling_check_H200.txt.
"""

import collections
import threading

from tinyllm.infer.batcher import Batcher, Request
from tinyllm.serve.models import load_served_models

QUESTIONS = ["李明住在哪里？", "12加7等于几？", "What pet does Li Ming have?", "你是谁？"]


def replies(batcher: Batcher, *specs: dict) -> list[str]:
    """Submit the requests together and wait for their texts."""
    texts, done = [""] * len(specs), [threading.Event() for _ in specs]

    def emitter(i):
        def emit(kind, value):
            if kind == "text":
                texts[i] += value.text
            else:
                done[i].set()
        return emit

    batcher.submit(*(Request(emit=emitter(i), **spec) for i, spec in enumerate(specs)))
    for event in done:
        assert event.wait(120), "a request never ended"
    return texts


def main() -> None:
    served = load_served_models(["artifacts/grpo"])[0]
    model, utf8 = served.load(device="cuda")
    batcher = Batcher(model, served.tok, served.stop_ids, utf8, slots=32)
    specs = []
    for i in range(32):
        prompt = served.tok.encode(f"<|im_start|>user\n{QUESTIONS[i % 4]}<|im_end|>\n<|im_start|>assistant\n").ids
        sampling = ({"temperature": 0} if i % 2 == 0 else
                    {"temperature": 1.0, "seed": i, "top_p": 0.95 if i % 4 == 1 else 1.0})
        specs.append({"prompt_ids": prompt, "max_tokens": 40, **sampling})
    alone = [replies(batcher, spec)[0] for spec in specs]
    same = [a == b for a, b in zip(alone, replies(batcher, *specs))]
    print("greedy equal:", sum(same[0::2]), "/ 16; sampled equal:", sum(same[1::2]), "/ 16")
    seeds = [{**specs[1], "top_p": 1.0, "seed": 100 + k} for k in range(32)]
    print("32 seeds of one prompt:", collections.Counter(replies(batcher, *seeds)).most_common(5))
    batcher.close()


if __name__ == "__main__":
    main()
