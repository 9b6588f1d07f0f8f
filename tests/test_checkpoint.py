import dataclasses

import pytest
import torch

from tinyllm.model.transformer import Transformer
from tinyllm.train.checkpoint import load_model, read_config, save_checkpoint


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_reproduces_logits(tmp_path, tiny_config, tie):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config, tie_embeddings=tie)).eval()
    save_checkpoint(model, tmp_path / "ckpt", meta={"stage": "test"})
    loaded = load_model(tmp_path / "ckpt").eval()
    x = torch.randint(0, tiny_config.vocab_size, (1, 10))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert read_config(tmp_path / "ckpt")["stage"] == "test"
    assert loaded.config == model.config


def test_overwrite_is_atomic_and_leaves_no_temp_folders(tmp_path, tiny_config):
    model = Transformer(tiny_config)
    save_checkpoint(model, tmp_path / "ckpt", meta={"v": 1})
    save_checkpoint(model, tmp_path / "ckpt", meta={"v": 2})
    assert read_config(tmp_path / "ckpt")["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_a_non_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not a checkpoint folder"):
        load_model(tmp_path)
