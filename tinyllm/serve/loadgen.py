"""Streaming chat clients for `tinyllm bench serve`, with the official openai client.

Each client runs in a process of its own, so that parsing the stream's JSON chunks does not make
the clients wait for each other on one interpreter lock (the server runs in another process too).
This module imports nothing heavier than openai, for the processes' sake.
"""

from __future__ import annotations

import time

QUESTIONS = ["李明住在哪里？", "你是谁？", "王芳是做什么工作的？", "3加5等于几？", "Where does Li Ming live?",
             "张伟养了什么宠物？", "What is Wang Fang's job?", "讲一个关于李明的故事。"]


def numbered_questions(count: int) -> list[str]:
    """`count` questions, QUESTIONS in turn, each numbered so that no two prompts are the same."""
    return [q + f"（第{i}题）" for i, q in enumerate(QUESTIONS * (count // len(QUESTIONS) + 1))][:count]


def ready(_: int) -> bool:
    """Called once per process before timing starts, so the imports are done."""
    import openai  # noqa: F401
    return True


def client(args: tuple) -> list[dict]:
    """Wait until `start_at` (time.time()), then send `requests` streaming chat requests one after
    another; for each: seconds to the first content, seconds to the end, completion tokens, and
    when it started and ended (time.time())."""
    import openai

    url, model, index, requests, max_tokens, start_at = args
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    for r in range(requests):
        start, first, tokens = time.time(), None, 0
        stream = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[(index + r) % len(QUESTIONS)]}],
            temperature=0.7, seed=index * 1000 + r, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.time()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.time()
        out.append({"ttft": (first or end) - start, "latency": end - start, "tokens": tokens, "start": start,
                    "end": end})
    return out


def reply_steps(args: tuple) -> tuple[str, list[tuple[bytes, float]]]:
    """One reply, greedy (seed None) or sampled at temperature 0.8 with `seed`, and per token (its
    bytes, how far its log-prob is above the runner-up's): where a batched greedy reply parts from
    its solo run, that margin tells a near-tie (a bf16 rounding step) from a real difference."""
    import openai

    url, model, question, max_tokens, seed = args
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed}
    api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                        max_tokens=max_tokens, logprobs=True, top_logprobs=2, **sampling)
    choice = reply.choices[0]
    # bytes, not the token's text: a token holding part of a UTF-8 character reads as "�" whatever it is
    steps = [(bytes(t.bytes), t.top_logprobs[0].logprob - t.top_logprobs[1].logprob) for t in choice.logprobs.content]
    return choice.message.content, steps


def parting(solo: list[tuple[bytes, float]], together: list[tuple[bytes, float]]) -> tuple[int, float] | None:
    """Where two replies (`reply_steps`'s steps) first differ: (token index, the solo run's top-2
    log-prob margin there); None if one is the other or a prefix of it."""
    for i, ((a, margin), (b, _)) in enumerate(zip(solo, together)):
        if a != b:
            return i, margin
    return None
