"""Continuous batching (tinyllm/infer/batcher.py) on the CPU: requests that share a batch get what
they get alone, join a running batch, leave it at once, and respect the caps."""

import itertools
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_chat_checkpoint, vary_weights

from tinyllm.config import ModelConfig, MoEConfig
from tinyllm.errors import UserError
from tinyllm.infer import batcher as batcher_module
from tinyllm.infer.batcher import Batcher, Finish, InvalidRequest, QueueFull, Request, row_uniform
from tinyllm.infer.generate import generate, inverse_cdf
from tinyllm.model.transformer import Transformer
from tinyllm.serve.models import load_served_models


def _served(folder: Path, tokenizer, moe=None) -> SimpleNamespace:
    """A random model whose weights are large enough that its replies vary from prompt to prompt
    (the default init gives near-uniform logits and one repeated token), with its tokenizer."""
    served = load_served_models([str(make_chat_checkpoint(folder, tokenizer, max_seq_len=96, moe=moe))])[0]
    model, utf8 = served.load()
    vary_weights(model)
    return SimpleNamespace(model=model, utf8=utf8, tok=served.tok, stop_ids=served.stop_ids, context=served.context)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    return _served(tmp_path_factory.mktemp("batcher"), tokenizer)


class Outcome:
    def __init__(self):
        self.text, self.finish, self.done, self.ended_at = "", None, threading.Event(), None
        self.logprobs, self.exact = [], []  # exact: (token, log-prob) unrounded

    def emit(self, kind, value):
        if kind == "text":
            self.text += value.text
            self.logprobs += [(e.token, round(e.logprob, 4), [t for t, _ in e.top]) for e in value.logprobs]
            self.exact += [(e.token, e.logprob) for e in value.logprobs]
        else:
            self.finish, self.ended_at = value, time.perf_counter()
            self.done.set()


def run(batcher: Batcher, *specs: dict) -> list[Outcome]:
    """Submit requests together and wait for all of them."""
    outcomes = [Outcome() for _ in specs]
    batcher.submit(*(Request(emit=o.emit, **spec) for o, spec in zip(outcomes, specs)))
    for o in outcomes:
        assert o.done.wait(60), "a request never ended"
    return outcomes


def alone_then_together(batcher: Batcher, specs: list[dict]) -> tuple[list[Outcome], list[Outcome]]:
    """Each request alone, one after another, then all of them at once."""
    return [run(batcher, spec)[0] for spec in specs], run(batcher, *specs)


def _mixed_requests(tok, count: int) -> list[dict]:
    """Greedy and seeded sampled requests with different prompts, lengths and settings."""
    settings = [{"temperature": 0}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.7, "top_p": 0.8, "seed": 2},
                {"temperature": 1.2, "top_k": 5, "seed": 3}, {"temperature": 0, "repetition_penalty": 1.3},
                {"temperature": 0.9, "repetition_penalty": 1.2, "seed": 4}]
    return [{"prompt_ids": tok.encode(f"第{i}个问题：李明养了什么？" + "他住在杭州。" * (i % 4)).ids,
             "max_tokens": 6 + i % 11, **{k: v + i if k == "seed" else v for k, v in settings[i % 6].items()}}
            for i in range(count)]


@pytest.mark.parametrize("overlap", [False, True])
def test_thirty_two_requests_together_get_what_each_gets_alone(served, overlap):
    batcher = Batcher(served.model, served.tok, served.stop_ids, served.utf8, slots=32, overlap=overlap)
    try:
        specs = _mixed_requests(served.tok, 32)
        alone, together = alone_then_together(batcher, specs)
        assert [o.text for o in together] == [o.text for o in alone]
        assert [o.finish for o in together] == [o.finish for o in alone]
        assert len({o.text for o in alone}) > 16  # the requests really differ
        # greedy requests also match the one-sequence engine that chat and eval use
        for spec, outcome in zip(specs, alone):
            if set(spec) == {"prompt_ids", "max_tokens", "temperature"}:
                ids = generate(served.model, spec["prompt_ids"], spec["max_tokens"], stop_ids=served.stop_ids,
                               utf8=served.utf8)
                assert served.tok.decode(ids) == outcome.text
        assert batcher.live_requests == 0 and batcher.queued == 0
    finally:
        batcher.close()


def test_an_invariant_batcher_gives_a_request_bitwise_the_reply_it_gets_alone(served):
    """The scheduler hands a row nothing of its neighbours: with `invariant` (every decode over all
    the slots, one batch shape; prompts prefilled alone in fixed chunks) each request gets bitwise
    the tokens and log-probs it gets alone. With the default batch-size buckets the matmuls' shapes
    change with the batch, and on the CPU so do the last bits of the log-probs: only closeness
    holds there."""
    specs = [{**spec, "temperature": 0, "logprobs": 0} for spec in _mixed_requests(served.tok, 32)]
    tokens = {}
    for invariant in (True, False):  # invariant: prompts alone in chunks of 64; else 16, as on a GPU with bf16
        batcher = Batcher(served.model, served.tok, served.stop_ids, served.utf8, decode_steps=4,
                          prefill_chunk=None if invariant else 16, invariant=invariant)
        try:
            assert (batcher.buckets, batcher.prefill_chunk) == (([32], 64) if invariant else ([1, 2, 4, 8, 16, 32], 16))
            assert batcher.cache.decode(32).fold_query_groups == invariant  # its attention without grouped heads
            outcomes = alone_then_together(batcher, specs)
        finally:
            batcher.close()
        assert all(isinstance(o.finish, Finish) for side in outcomes for o in side)  # none ended in an error
        alone, together = ([o.exact for o in side] for side in outcomes)
        tokens[invariant] = [[token for token, _ in reply] for reply in together]
        if invariant:
            assert alone == together
        else:  # the same tokens (fp32 has no near-ties here), log-probs equal up to rounding
            assert [[token for token, _ in r] for r in alone] == tokens[False]
            flat = [torch.tensor([logprob for reply in run for _, logprob in reply]) for run in (alone, together)]
            assert torch.allclose(*flat, atol=1e-4)
    assert tokens[True] == tokens[False]  # the folded attention computes what the grouped one does


def test_several_tokens_per_decode_launch_change_nothing(served):
    """With decode_steps > 1 (the GPU default) a request that ends inside a launch (stop token,
    stop string, max_tokens, the context) drops the rest: replies, finishes and log-probs are
    those of one token per launch."""
    specs = _mixed_requests(served.tok, 24)
    for room in (3, 6):  # the context ends inside a launch (3) or with one (6)
        specs.append({"prompt_ids": served.tok.encode("讲个故事" * 30).ids[:served.context - room], "max_tokens": 20,
                      "temperature": 0})
    one = Batcher(served.model, served.tok, served.stop_ids, served.utf8, decode_steps=1)
    five = Batcher(served.model, served.tok, served.stop_ids, served.utf8, decode_steps=5)
    try:
        for i, (spec, outcome) in enumerate(zip(specs[:12], run(one, *specs[:12]))):
            spec["logprobs"] = i % 3
            if i % 2 and len(outcome.text) > 4:  # a stop string from the middle of the reply
                spec["stop"] = [outcome.text[len(outcome.text) // 2]]
        expected, got = run(one, *specs), run(five, *specs)
        assert [(o.text, o.finish, o.logprobs) for o in got] == [(o.text, o.finish, o.logprobs) for o in expected]
        assert {o.finish.reason for o in got} == {"stop", "length"}
        assert any(o.logprobs for o in got) and [o.finish.completion_tokens for o in got[-2:]] == [3, 6]
        assert five.live_requests == 0 and five.queued == 0
    finally:
        one.close()
        five.close()
    with pytest.raises(ValueError, match="decode_steps"):
        Batcher(served.model, served.tok, served.stop_ids, decode_steps=0)


def _record_calls(batcher: Batcher, order: list[str], names: dict[str, str]) -> None:
    """Each call of the batcher's methods `names` appends its label to `order`, then runs."""
    def recording(run, label):
        def recorded(*args):
            order.append(label)
            return run(*args)
        return recorded

    for method, label in names.items():
        setattr(batcher, method, recording(getattr(batcher, method), label))


def _newest_if_log_probs(hand_out, launches: list):
    """`hand_out`, checking that a launch whose requests want log-probs is the newest one."""
    def checked(launch):
        if any(live.request.logprobs is not None for live in launch.lives):
            assert launch is launches[-1], "a launch with log-probs was handed out after the next one"
        return hand_out(launch)
    return checked


def test_overlapped_launches_hand_out_the_same_replies_one_launch_later(served, monkeypatch):
    """`overlap`: a launch's tokens are handed out after the next launch has started, and the replies
    (greedy, seeded, stopped early, with log-probs or not) and finishes are those without overlap.
    A launch whose requests want log-probs is handed out before the next one (on a GPU the next
    replay overwrites the logits they are read from)."""
    launches = []

    class Recorded(batcher_module._Launch):
        def __init__(self, *args):
            super().__init__(*args)
            launches.append(self)

    monkeypatch.setattr(batcher_module, "_Launch", Recorded)
    specs = _mixed_requests(served.tok, 12)
    for spec in specs[9:]:
        spec["logprobs"] = 2  # the last ones: launches with these live are handed out at once
    order = []
    results = {}
    for overlap in (False, True):
        batcher = Batcher(served.model, served.tok, served.stop_ids, served.utf8, slots=4, overlap=overlap)
        _record_calls(batcher, order, {"_decoder": "launch", "_hand_out": "hand out"})
        batcher._hand_out = _newest_if_log_probs(batcher._hand_out, launches)
        try:
            results[overlap] = [(o.text, o.finish, o.logprobs) for o in run(batcher, *specs)]
            assert batcher.live_requests == 0 and batcher.queued == 0
        finally:
            batcher.close()
        launched_before_handing_out = ("launch", "launch") in itertools.pairwise(order)
        assert launched_before_handing_out == overlap, order
        order.clear()
    assert results[True] == results[False]
    assert any(logprobs for _, _, logprobs in results[True]) and len({text for text, _, _ in results[True]}) > 6


def test_fixed_shape_prefill_gives_the_replies_of_batched_prefill(served):
    """Prompts prefilled alone in fixed (1, 16) chunks (as on a GPU, in CUDA graphs of 64) give the
    replies of all a step's prompts in one right-padded forward, alone and among the others."""
    specs = _mixed_requests(served.tok, 12)
    assert max(len(s["prompt_ids"]) for s in specs) > 2 * 16  # several chunks per prompt
    together = Batcher(served.model, served.tok, served.stop_ids, served.utf8)
    fixed = Batcher(served.model, served.tok, served.stop_ids, served.utf8, prefill_chunk=16)
    try:
        assert together.prefill_chunk is None
        expected = [o.text for o in run(together, *specs)]
        assert [run(fixed, spec)[0].text for spec in specs[:3]] == expected[:3]
        assert [o.text for o in run(fixed, *specs)] == expected
    finally:
        together.close()
        fixed.close()


def test_in_bf16_seeded_requests_get_the_same_replies_alone_and_among_others(served):
    """bf16 weights (the GPU's serving dtype; `--dtype bfloat16` on a CPU) keep 8 significant bits,
    so a last bit that depends on the batch's shapes can change a sample. With bf16 weights a dense
    model's prompts are prefilled alone in one fixed shape, so a prompt's cache holds the same bits
    whatever else is prefilled beside it. The decode runs at one shape, so that only the prefill is
    tested. The model is 512 wide with its initial weights: long sums, and near-uniform next-token
    probabilities that any change of a last bit can move. (With a step's prompts prefilled together
    in one right-padded forward, as fp32 weights are on a CPU, 5 of these 32 replies parted from
    their solo runs on the dev VM.)"""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = ModelConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                          vocab_size=served.tok.get_vocab_size())
        model = Transformer(cfg).to(torch.bfloat16).eval()
    specs = [{"prompt_ids": spec["prompt_ids"], "max_tokens": 16, "temperature": 1.0, "seed": i}
             for i, spec in enumerate(_mixed_requests(served.tok, 32))]
    batcher = Batcher(model, served.tok, set(), served.utf8)
    batcher.buckets = [batcher.slots]  # what `invariant` also sets; here the prefill alone must be the default
    try:
        assert batcher.prefill_chunk is not None
        alone, together = alone_then_together(batcher, specs)
    finally:
        batcher.close()
    assert len({o.text for o in alone}) == 32  # the requests really differ
    assert [o.text for o in together] == [o.text for o in alone]


def test_long_prompts_prefill_in_chunks_beside_running_requests(served):
    specs = _mixed_requests(served.tok, 12)
    whole = Batcher(served.model, served.tok, served.stop_ids, served.utf8, prefill_tokens=1024)
    chunked = Batcher(served.model, served.tok, served.stop_ids, served.utf8, prefill_tokens=7)
    try:
        assert max(len(s["prompt_ids"]) for s in specs) > 3 * 7  # several steps per prompt
        assert [o.text for o in run(chunked, *specs)] == [o.text for o in run(whole, *specs)]
    finally:
        whole.close()
        chunked.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_a_short_request_joins_a_running_batch_and_leaves_first(served, overlap):
    batcher = Batcher(served.model, served.tok, set(), served.utf8, overlap=overlap)  # no stop token: the long one
    # runs its length
    try:
        long, short = Outcome(), Outcome()
        prompt = served.tok.encode("讲个故事").ids
        batcher.submit(Request(prompt, 80, long.emit))
        while not long.text:
            time.sleep(0.001)
        batcher.submit(Request(prompt, 3, short.emit))
        assert short.done.wait(30) and long.done.wait(30)
        assert short.ended_at < long.ended_at and short.finish.completion_tokens == 3
        assert long.finish.completion_tokens == 80 and long.finish.reason == "length"
    finally:
        batcher.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_caps_on_live_tokens_and_on_the_queue(served, overlap):
    prompt = served.tok.encode("你好").ids
    most_live = []
    batcher = Batcher(served.model, served.tok, set(), served.utf8, slots=3, max_live_tokens=2 * (len(prompt) + 10),
                      max_queue=4, overlap=overlap)  # 3 slots, but tokens for 2; 4 may wait beyond the free slots
    try:
        outcomes = [Outcome() for _ in range(6)]

        def emit(outcome):
            def record(kind, value):
                most_live.append(batcher.live_requests)
                outcome.emit(kind, value)
            return record

        batcher.submit(*(Request(prompt, 10, emit(o)) for o in outcomes))
        with pytest.raises(QueueFull):
            batcher.submit(*(Request(prompt, 10, Outcome().emit) for _ in range(2)))
        for o in outcomes:
            assert o.done.wait(30)
        assert max(most_live) == 2 and all(o.finish.completion_tokens == 10 for o in outcomes)
        with pytest.raises(ValueError, match="prompt"):
            batcher.submit(Request([1] * served.context, 1, Outcome().emit))
        with pytest.raises(ValueError, match="more than the server holds at once"):  # could never be admitted
            batcher.submit(Request(prompt, 2 * (len(prompt) + 10), Outcome().emit))
    finally:
        batcher.close()


@pytest.mark.parametrize("overlap", [False, True])
def test_cancelled_requests_free_their_slots_at_the_next_step(served, overlap):
    batcher = Batcher(served.model, served.tok, set(), served.utf8, slots=2, overlap=overlap)
    try:
        prompt = served.tok.encode("讲个故事").ids
        outcomes = [Outcome() for _ in range(3)]
        requests = [Request(prompt, 90, o.emit) for o in outcomes]
        batcher.submit(*requests)
        while batcher.live_requests < 2:
            time.sleep(0.001)
        for request in requests:
            request.cancel()
        for o in outcomes:
            assert o.done.wait(10) and o.finish.reason == "cancelled"
        assert outcomes[2].finish.completion_tokens == 0  # the third never got a slot
        assert batcher.live_requests == 0 and batcher.cancelled_requests == 3
    finally:
        batcher.close()


def test_an_moe_model_batches_too(tmp_path, tokenizer):
    served = _served(tmp_path, tokenizer, moe=MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=1,
                                                        top_k=2, first_dense_layers=1))
    batcher = Batcher(served.model, served.tok, served.stop_ids, served.utf8)
    try:
        specs = _mixed_requests(served.tok, 8)
        alone = [run(batcher, spec)[0].text for spec in specs]
        assert [o.text for o in run(batcher, *specs)] == alone and len(set(alone)) > 4
    finally:
        batcher.close()
    with pytest.raises(UserError, match="^--batch-invariant needs a dense model"):
        Batcher(served.model, served.tok, served.stop_ids, invariant=True)


def test_each_row_draws_its_own_number_and_samples_follow_the_distribution():
    seeds, steps = torch.tensor([5, 5, 6, 2**62 + 5]), torch.tensor([0, 1, 0, 0])
    u = row_uniform(seeds, steps)
    assert u.shape == (4,) and 0 < u.min() and u.max() < 1
    assert torch.equal(u[1:2], row_uniform(seeds[1:2], steps[1:2]))  # alone = in a batch
    assert len(set(u.tolist())) == 4  # seed, step and the high bits all matter
    # inverse CDF over many steps: frequencies follow the probabilities; a zero is never drawn
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    draws = 20000
    picked = inverse_cdf(probs.expand(draws, -1), row_uniform(torch.full((draws,), 7), torch.arange(draws)))
    freq = torch.bincount(picked, minlength=6) / draws
    assert torch.allclose(freq, probs, atol=0.015), freq
    assert freq[1] == freq[5] == 0
    # the edges of (0, 1): the first and the last token of positive probability
    edges = inverse_cdf(probs.expand(2, -1), torch.tensor([0.0, 1 - 2**-33], dtype=torch.float64))
    assert edges.tolist() == [0, 4]


def test_waiting_requests_that_leave_end_at_once_and_closing_ends_the_rest(served):
    batcher = Batcher(served.model, served.tok, set(), served.utf8, slots=1, max_queue=3)
    prompt = served.tok.encode("讲个故事").ids
    outcomes = [Outcome() for _ in range(4)]
    requests = [Request(prompt, 80, o.emit) for o in outcomes]
    try:
        batcher.submit(*requests)  # one runs, three wait
        requests[2].cancel()  # in the middle of the line
        assert outcomes[2].done.wait(10) and outcomes[2].finish == Finish("cancelled", len(prompt), 0)
    finally:
        batcher.close()
    assert all(o.done.is_set() for o in outcomes)  # closing ends the live and the waiting ones
    assert [o.finish.reason for o in outcomes] == ["cancelled"] * 4


def test_out_of_range_settings_are_safe(served):
    batcher = Batcher(served.model, served.tok, set(), served.utf8)
    try:
        prompt = served.tok.encode("讲个故事").ids
        huge = run(batcher, {"prompt_ids": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 3,
                             "top_k": 10**6})[0]  # beyond the vocabulary: all of it
        off = run(batcher, {"prompt_ids": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 3})[0]
        assert huge.finish.completion_tokens == 5 and huge.text == off.text
        with pytest.raises(ValueError, match="max_tokens"):
            batcher.submit(Request(prompt, 0, Outcome().emit))
        # settings no float32 row can hold are refused at submit; they used to fail the whole batch's step
        for name, value in (("top_k", 2**63), ("repetition_penalty", 1e300), ("repetition_penalty", 1e-300),
                            ("top_p", 0.0), ("temperature", float("nan")), ("seed", -1)):
            with pytest.raises(InvalidRequest, match=f"{name} must be") as err:
                batcher.submit(Request(prompt, 5, Outcome().emit, **{name: value}))
            assert err.value.param == name
        tiny = run(batcher, {"prompt_ids": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 3, "top_p": 1e-50})[0]
        greedy = run(batcher, {"prompt_ids": prompt, "max_tokens": 5})[0]
        assert tiny.text == greedy.text  # the nucleus keeps the most likely token however small top_p is
    finally:
        batcher.close()
