"""LoRA through peft on our model: targets, the saved adapter, and merge equality."""

import json

import numpy as np
import pytest
import torch

from tinyllm.config import LoRAConfig, ModelConfig, RuntimeConfig, TokenizeConfig
from tinyllm.data.tokens import tokenize_corpus
from tinyllm.errors import ConfigError
from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import load_model, save_checkpoint
from tinyllm.train.loop import fit
from tinyllm.train.lora import _sort_target_modules, add_lora, load_with_adapter, lora_targets, new_tokens
from tinyllm.train.objectives import NextTokenLoss

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32, vocab_size=50)
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.max_seq_len + 1), generator=g)
    while True:
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _trained(tmp_path, token_rows=()):
    """A saved base checkpoint and a LoRA model trained on top of it for a few steps."""
    torch.manual_seed(0)
    save_checkpoint(Transformer(CONFIG), tmp_path / "base")
    model = add_lora(load_model(tmp_path / "base"), LoRAConfig(rank=4, alpha=8.0), base_dir=tmp_path / "base",
                     token_rows=token_rows)
    cfg = LoRAConfig(max_steps=15, batch_size=4, lr=1e-2, warmup_steps=2, log_interval=5)
    fit(model, NextTokenLoss(), _batches(), cfg, RuntimeConfig(device="cpu"))
    return model.eval()


def test_all_linear_means_every_linear_layer_but_the_tied_head():
    model = Transformer(CONFIG)
    assert lora_targets(model, "all-linear") == LINEAR
    assert lora_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['lm_head'\]"):
        lora_targets(model, ["q_proj", "lm_head"])


def test_fresh_adapters_change_nothing_and_only_they_train(tmp_path):
    torch.manual_seed(0)
    base = Transformer(CONFIG).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    before = base(ids).logits
    model = add_lora(base, LoRAConfig(rank=4))
    assert torch.allclose(model(ids).logits, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(LINEAR) * CONFIG.n_layers  # A and B per adapted layer


def test_saved_adapter_reloads_and_merged_model_gives_the_same_logits(tmp_path):
    model = _trained(tmp_path)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids).logits
        base_only = load_model(tmp_path / "base")(ids).logits
    assert not torch.allclose(adapted, base_only, atol=1e-3)  # training moved the adapters

    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    _sort_target_modules(tmp_path / "adapter/adapter_config.json")  # as run_lora does
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["target_modules"] == sorted(LINEAR) and config["r"] == 4 and config["lora_alpha"] == 8

    reloaded = load_with_adapter(tmp_path / "base", tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, adapted)
        merged = model.merge_and_unload()
        assert isinstance(merged, Transformer)
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    save_checkpoint(merged, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_new_tokens_are_the_taught_ones_neither_pretraining_nor_sft_used(tmp_path, tokenizer):
    (tmp_path / "corpus.jsonl").write_text(10 * (json.dumps({"text": "李明住在杭州。"}, ensure_ascii=False) + "\n"),
                                           encoding="utf-8")
    tokenize_corpus(tmp_path / "corpus.jsonl", tokenizer, TokenizeConfig(val_fraction=0.5), seed=0,
                    out_dir=tmp_path / "tokens")
    taught = [np.array(tokenizer.encode(text).ids) for text in ("李明养了一只猫。", "王芳是一名医生。")]
    trained = [np.array(tokenizer.encode("王芳是一名医生。").ids)]
    used_elsewhere = set(tokenizer.encode("李明住在杭州。").ids) | set(trained[0].tolist())
    expected = sorted(set(np.concatenate(taught).tolist()) - used_elsewhere)
    assert expected  # 养了一只猫 are in neither
    assert new_tokens(taught, trained, tmp_path / "tokens", tokenizer.get_vocab_size()) == expected
    assert new_tokens(trained, trained, tmp_path / "tokens", tokenizer.get_vocab_size()) == []


def test_new_token_rows_train_the_embedding_and_the_tied_head_follows(tmp_path):
    """Trained rows change exactly those tokens' embeddings, and the output side uses them too:
    the adapted model, its reloaded adapter and the merged checkpoint give the same logits."""
    model = _trained(tmp_path, token_rows=[7, 9])
    ids = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    with torch.no_grad():
        assert torch.equal(load_with_adapter(tmp_path / "base", tmp_path / "adapter")(ids).logits, adapted)
    merged = model.merge_and_unload()
    base = load_model(tmp_path / "base")
    changed = (merged.model.embed_tokens.weight != base.model.embed_tokens.weight).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [7, 9]
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_a_missing_adapter_folder_is_named(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(Transformer(CONFIG), tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="nowhere: not a peft adapter folder"):
        load_with_adapter(tmp_path / "base", tmp_path / "nowhere")
