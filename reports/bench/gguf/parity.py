"""The pipeline's GGUF in real llama.cpp against our engine (issue 21):

    python reports/bench/gguf/parity.py artifacts/grpo artifacts/gguf/tinyllm.gguf

Greedy continuations of 32 tokens for 20 prompts (10 plain, 10 chat-templated): how many equal our
engine's, and for each that differs, where and by how much our two best logits differed there; then
one chat completion through llama.cpp's chat handler (our template from the GGUF), and whether it
stops at <|im_end|> with our engine's reply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp
import torch

from tinyllm.data.tokenizer import load_tokenizer, render_chat, reply_stop_ids
from tinyllm.infer.generate import generate
from tinyllm.train.checkpoint import load_model

PEOPLE = ["李明", "王芳", "张伟", "刘洋", "Li Ming"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("gguf", type=Path)
    args = parser.parse_args()
    model, tok = load_model(args.checkpoint), load_tokenizer(args.checkpoint)
    theirs = llama_cpp.Llama(model_path=str(args.gguf), n_ctx=model.config.max_seq_len, verbose=False, seed=0)
    prompts = [f"{p}住在" for p in PEOPLE] + [f"{p}的工作是" for p in PEOPLE] + [
        render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in [f"{p}住在哪里？" for p in PEOPLE] + [f"{p}养了什么宠物？" for p in PEOPLE]]
    same = 0
    for prompt in prompts:
        ids = tok.encode(prompt).ids
        expected = generate(model, ids, 32)
        theirs.reset()
        got = [t for _, t in zip(range(32), theirs.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0))]
        if got == expected:
            same += 1
            continue
        at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        with torch.no_grad():
            top2 = model(torch.tensor([ids + expected[:at]])).logits[0, -1].topk(2).values
        print(f"differs: {prompt!r} at token {at}, our top-2 logit gap {float(top2[0] - top2[1]):.4f}")
    print(f"greedy continuations equal to our engine's: {same}/{len(prompts)}")
    question = [{"role": "user", "content": "李明住在哪里？"}]
    ids = tok.encode(render_chat(question, add_generation_prompt=True)).ids
    ours = tok.decode(generate(model, ids, 64, stop_ids=reply_stop_ids(tok)))
    answer = theirs.create_chat_completion(messages=question, temperature=0.0, top_k=1, max_tokens=64)["choices"][0]
    print(f"chat: llama.cpp {answer['message']['content']!r} (finish {answer['finish_reason']}); ours {ours!r}; "
          f"equal: {answer['message']['content'] == ours}")


if __name__ == "__main__":
    main()
