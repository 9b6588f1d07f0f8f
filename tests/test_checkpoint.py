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
    # what the file leaves out is rebuilt: the tied head is the embedding itself, the RoPE tables a new model's
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)
    assert all(p.dtype == torch.float32 and p.requires_grad and not p.is_meta for p in loaded.parameters())


def test_loading_draws_no_random_weights_unless_asked(tmp_path, tiny_config):
    """The file's weights replace the random ones, so load_model does not draw them (1 s at 768×8);
    load_for_finetuning does, so LoRA's adapters start from the random state they always did."""
    save_checkpoint(Transformer(tiny_config), tmp_path / "ckpt")

    def next_numbers_after(build) -> torch.Tensor:
        torch.manual_seed(0)
        build()
        return torch.rand(3)

    unbuilt = next_numbers_after(lambda: None)
    assert torch.equal(next_numbers_after(lambda: load_model(tmp_path / "ckpt")), unbuilt)
    drawn = next_numbers_after(lambda: load_model(tmp_path / "ckpt", draw_random_init=True))
    assert torch.equal(drawn, next_numbers_after(lambda: Transformer(tiny_config))) and not torch.equal(drawn, unbuilt)


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
