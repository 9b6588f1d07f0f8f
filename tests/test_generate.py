import torch

from tinyllm.infer.generate import generate, generate_batch, next_tokens, stream_tokens
from tinyllm.model.transformer import Transformer


def greedy_by_full_recompute(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_greedy_with_kv_cache_equals_full_recompute(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    prompt = [5, 9, 2, 7]
    assert prompt + generate(model, prompt, 12) == greedy_by_full_recompute(model, prompt, 12)


def test_stop_id_ends_generation_and_is_not_returned(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    free = generate(model, [1, 2, 3], 10)
    stopped = generate(model, [1, 2, 3], 10, stop_ids={free[3]})
    assert stopped == free[: free.index(free[3])]


def test_sampling_is_reproducible_with_a_seed(tiny_config):
    model = Transformer(tiny_config).eval()
    a = generate(model, [1, 2], 15, temperature=1.0, top_k=10, seed=7)
    b = generate(model, [1, 2], 15, temperature=1.0, top_k=10, seed=7)
    assert a == b and len(a) == 15


def test_generation_stops_at_the_context_limit(tiny_config):
    model = Transformer(tiny_config).eval()
    assert len(list(stream_tokens(model, list(range(60)), 50))) == tiny_config.max_seq_len - 60


def test_batched_generation_equals_one_prompt_at_a_time(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    prompts = [[5, 9, 2, 7], [1], [3, 3, 8, 1, 6, 2, 9], [4, 4]]
    alone = [generate(model, p, 10) for p in prompts]
    assert generate_batch(model, prompts, 10, pad_id=0) == alone
    stop = {alone[2][3]}
    assert generate_batch(model, prompts, 10, stop_ids=stop) == [generate(model, p, 10, stop_ids=stop) for p in prompts]


@torch.no_grad()
def test_padding_never_leaks_into_real_rows(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    short, long = [7, 1, 4], list(range(1, 30))
    alone = model(torch.tensor([short])).logits[0]
    for pad in (0, 50, 96):  # whatever the padding token is, the short row's logits do not change
        ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
        valid = ids != -1
        valid[0, : len(long) - len(short)] = False
        logits = model(ids, key_valid=valid).logits[0, -len(short):]
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
        assert generate_batch(model, [short, long], 6, pad_id=pad)[0] == generate(model, short, 6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    from tinyllm.infer.generate import next_tokens

    logits = torch.tensor([[2.0, 1.0, -1.0, -1.5]])
    seen = torch.tensor([[True, False, False, False]])
    assert int(next_tokens(logits, 0.0, None, None, None)) == 0
    assert int(next_tokens(logits, 0.0, None, None, None, repetition_penalty=3.0, seen=seen)) == 1  # 2/3 < 1
    negative = torch.tensor([[-1.0, -1.5]])
    assert int(next_tokens(negative, 0.0, None, None, None, repetition_penalty=3.0,
                           seen=torch.tensor([[True, False]]))) == 1  # -1 * 3 = -3 falls below -1.5


def test_repetition_penalty_changes_a_repetitive_reply_the_same_way_alone_and_batched(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    prompts = [[5, 9, 2, 7], [1], [3, 3, 8, 1, 6, 2, 9]]
    plain = [generate(model, p, 20) for p in prompts]
    penalised = [generate(model, p, 20, repetition_penalty=5.0) for p in prompts]
    assert penalised != plain
    repeats = sum(len(r) - len(set(r)) for r in penalised), sum(len(r) - len(set(r)) for r in plain)
    assert repeats[0] < repeats[1]  # fewer repeated tokens
    assert generate_batch(model, prompts, 20, repetition_penalty=5.0) == penalised


def test_static_shape_decoding_gives_the_same_tokens_alone_and_batched(tiny_config):
    """The GPU path (StaticKVCache: whole-buffer attention under a position mask), run eagerly here."""
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    prompts = [[5, 9, 2, 7], [1], [3, 3, 8, 1, 6, 2, 9]]
    for prompt in prompts:
        assert generate(model, prompt, 12, static=True) == generate(model, prompt, 12, static=False)
    sampled = [generate(model, p, 12, temperature=1.0, top_p=0.9, seed=3, static=True) for p in prompts]
    assert sampled == [generate(model, p, 12, temperature=1.0, top_p=0.9, seed=3, static=False) for p in prompts]
    assert generate_batch(model, prompts, 12, static=True) == generate_batch(model, prompts, 12, static=False)
    # the cache is kept per batch size and reused: a second request starts clean
    assert generate_batch(model, prompts, 12, static=True) == generate_batch(model, prompts, 12, static=False)


def test_a_smaller_static_batch_padded_to_the_full_ones_rows_gives_its_own_replies(tiny_config):
    """An eval's last chunk padded to its full chunks' rows: the replies it gets unpadded, greedy and
    seeded, and no static decoder of a new batch size (on a GPU, no second compile)."""
    from tinyllm.infer.generate import _STATIC

    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    prompts = [[5, 9, 2, 7], [1], [3, 3, 8, 1, 6, 2, 9], [4, 4], [2, 8, 6]]
    stop = {generate(model, [1], 12)[2]}
    alone = [generate(model, p, 12, stop_ids=stop, static=False) for p in prompts]
    assert generate_batch(model, prompts, 12, stop_ids=stop, static=True, pad_to_rows=5) == alone
    assert generate_batch(model, prompts[:2], 12, stop_ids=stop, static=True, pad_to_rows=5) == alone[:2]
    sampling = dict(temperature=1.0, top_p=0.9, seed=3, repetition_penalty=1.3)
    assert (generate_batch(model, prompts[:2], 12, static=True, pad_to_rows=5, **sampling)
            == generate_batch(model, prompts[:2], 12, static=False, **sampling))
    assert set(_STATIC[model]) == {5}


def test_a_model_that_decoded_statically_is_freed_with_its_decoders(tiny_config):
    """Eval decodes checkpoint after checkpoint: the pooled static decoders must not keep them alive."""
    import gc
    import weakref

    from tinyllm.infer.generate import _STATIC

    model = Transformer(tiny_config).eval()
    generate_batch(model, [[5, 9, 2, 7], [1]], 4, static=True)
    assert len(_STATIC[model]) == 1
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_two_static_generations_at_once_use_their_own_caches(tiny_config):
    """Two interleaved streams (two web tabs on a GPU) must not share a static cache."""
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    a, b = stream_tokens(model, [5, 9, 2, 7], 12, static=True), stream_tokens(model, [1, 2], 12, static=True)
    together = [(next(a), next(b)) for _ in range(12)]
    assert [x for x, _ in together] == generate(model, [5, 9, 2, 7], 12, static=False)
    assert [y for _, y in together] == generate(model, [1, 2], 12, static=False)


def test_a_vanishing_temperature_or_top_p_samples_the_most_likely_token():
    """1e-50 overflowed the scaled logits (NaN probabilities) or emptied the nucleus, and the draw
    fell past the vocabulary; the most likely token always stays."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [4.0, -2.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1e-50, None), (1.0, 1e-50), (1e-50, 1e-50)):
        assert next_tokens(logits, temperature, None, top_p, generator).tolist() == [1, 0]
