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


def test_two_runs_that_differ_only_in_timing_write_the_same_folder(tmp_path, tiny_config):
    """So `dvc repro` sees an unchanged out, and reruns nothing after a stage that trained the same weights."""
    model = Transformer(tiny_config)
    for name, seconds in (("a", 12.5), ("b", 40.1)):
        summary = {"train/loss": 1.25, "kept_step": 400, "train_seconds": seconds, "startup_seconds": seconds / 10,
                   "tokens_per_sec": 1e4 / seconds, "train/rollout_tokens_per_sec": 5e3 / seconds, "mfu": 0.1 * seconds}
        save_checkpoint(model, tmp_path / name, meta={"stage": "sft", "summary": summary})
    assert [f.name for f in sorted((tmp_path / "a").iterdir())] == [f.name for f in sorted((tmp_path / "b").iterdir())]
    for a in (tmp_path / "a").iterdir():
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes()
    assert read_config(tmp_path / "a")["summary"] == {"train/loss": 1.25, "kept_step": 400}


def test_loading_a_non_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not a checkpoint folder"):
        load_model(tmp_path)
