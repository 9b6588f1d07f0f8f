import dataclasses
import hashlib
import itertools
import math
import subprocess
import sys

import pytest
import torch

from tinyllm.config import TrainConfig
from tinyllm.model.transformer import Attention, KVCache, StaticKVCache, Transformer, apply_rope, rope_tables


def test_weight_names_follow_hugging_face_llama(tiny_config):
    names = set(Transformer(tiny_config).state_dict())
    for expected in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                     "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.norm.weight", "lm_head.weight"):
        assert expected in names


def test_gqa_projection_shapes(tiny_config):
    attn = Transformer(tiny_config).model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (2 * 16, 64)


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(head_dim=8, max_len=32, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rotated = apply_rope(q.expand(1, 1, 32, 8), cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 32), atol=1e-5)
    # <rope(q, m), rope(k, n)> depends only on m - n
    kr = apply_rope(k.expand(1, 1, 32, 8), cos, sin)
    dot = lambda m, n: (rotated[0, 0, m] * kr[0, 0, n]).sum()
    assert torch.allclose(dot(5, 2), dot(20, 17), atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_rope_tables_are_the_correctly_rounded_values_in_every_process():
    """torch's first parallel cos sometimes left half the table 7e-9 off in a fresh process, so the
    same params trained other weights; the tables come from NumPy, equal to `math.cos` rounded to
    float32 at the default shape, in every process."""
    inv_freq = [1.0 / 10000.0 ** (i / 48) for i in range(0, 48, 2)] * 2
    expected = torch.tensor([[math.cos(p * f) for f in inv_freq] for p in range(128)], dtype=torch.float64).float()
    with pytest.MonkeyPatch.context() as patch:  # torch's own cos/sin are what went wrong
        for name in ("cos", "sin"):
            patch.setattr(torch.Tensor, name, lambda *a: pytest.fail("rope_tables used torch's trig"))
            patch.setattr(torch, name, lambda *a: pytest.fail("rope_tables used torch's trig"))
        cos, _ = rope_tables(head_dim=48, max_len=128, theta=10000.0)  # the default model's shape
    assert torch.equal(cos, expected)
    script = ("import hashlib; from tinyllm.model.transformer import rope_tables; "
              "print(hashlib.sha256(rope_tables(48, 128, 10000.0)[0].numpy().tobytes()).hexdigest())")
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    digests = {process.communicate(timeout=120)[0] for process in processes}  # four fresh processes side by side
    assert [process.returncode for process in processes] == [0] * 4
    assert digests == {hashlib.sha256(expected.numpy().tobytes()).hexdigest() + "\n"}


def test_causality_future_tokens_never_change_past_logits(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 20))
    changed = x.clone()
    changed[:, 11:] = torch.randint(0, tiny_config.vocab_size, (2, 9))
    a, b = model(x).logits, model(changed).logits
    assert torch.allclose(a[:, :11], b[:, :11], atol=1e-6)
    assert not torch.allclose(a[:, 11:], b[:, 11:], atol=1e-3)


@pytest.mark.parametrize("fold_query_groups", [False, True])
def test_kv_cache_decoding_equals_full_recompute(tiny_config, fold_query_groups, monkeypatch):
    """Also with the query heads of each group folded into rows (the batch-invariant server's
    attention): the same sums as SDPA's grouped heads, for chunks and single tokens."""
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 24))
    full = model(x).logits
    cache = KVCache(tiny_config, 2, 24, "cpu", torch.float32)
    cache.fold_query_groups = fold_query_groups
    # a chunked prefill (0:10, 10:15), then one token at a time
    decoded, folded = decode_in_pieces(model, cache, x, [0, 10, *range(15, 25)], monkeypatch)
    assert torch.allclose(full, decoded, atol=1e-5)
    # every forward after the first (which starts the cache: plain causal attention) has a mask
    assert folded == (10 * tiny_config.n_layers if fold_query_groups else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_static_cache_folds_grouped_heads_in_float32_only(tiny_config, dtype, monkeypatch):
    """cuDNN's attention, the one CUDA kernel that takes grouped heads with a mask, runs in half
    precision only: float32 decode steps fold the groups (eval), bf16 ones leave them to SDPA
    (GRPO's rollouts, where folding was slower). Either way the steps decode what the model computes."""
    torch.manual_seed(0)
    model = Transformer(tiny_config).to(dtype).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 12))
    cache = StaticKVCache(tiny_config, 2, 12, "cpu", dtype)
    with torch.no_grad():
        full = model(x).logits
        decoded, folded = decode_in_pieces(model, cache, x, [0, *range(8, 13)], monkeypatch)  # prompt, then tokens
    assert cache.fold_query_groups == (dtype == torch.float32)
    assert folded == (5 * tiny_config.n_layers if dtype == torch.float32 else 0)  # every step is masked
    assert torch.allclose(full.float(), decoded.float(), atol=1e-5 if dtype == torch.float32 else 0.1)


def decode_in_pieces(model, cache, x, bounds, monkeypatch) -> tuple[torch.Tensor, int]:
    """The logits of `x` fed through `cache` piece by piece (x[:, a:b] for each pair of `bounds`), and
    how many attention calls folded their grouped heads."""
    folded = []
    fold = Attention._folded_gqa_attention
    monkeypatch.setattr(Attention, "_folded_gqa_attention", lambda *args: folded.append(1) or fold(*args))
    pieces = [model(x[:, start:end], cache=cache).logits for start, end in itertools.pairwise(bounds)]
    return torch.cat(pieces, 1), len(folded)


def test_too_long_input_is_refused(tiny_config):
    model = Transformer(tiny_config)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_and_untied_embeddings(tiny_config):
    tied = Transformer(tiny_config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = Transformer(dataclasses.replace(tiny_config, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == tiny_config.vocab_size * tiny_config.dim
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)


def test_tiny_model_overfits_one_batch(tiny_config):
    from tinyllm.config import RuntimeConfig
    from tinyllm.train.loop import fit
    from tinyllm.train.objectives import NextTokenLoss

    torch.manual_seed(0)
    model = Transformer(tiny_config)
    rows = torch.randint(0, tiny_config.vocab_size, (4, 33))
    batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    cfg = TrainConfig(max_steps=150, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=10, log_interval=10,
                      weight_decay=0.0)
    result = fit(model, NextTokenLoss(), iter(lambda: batch, None), cfg, RuntimeConfig(device="cpu"))
    assert result.history[0]["train/loss"] > 3.0  # ln(97) ≈ 4.6 at the start
    assert result.final["train/loss"] < 0.1
