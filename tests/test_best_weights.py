"""Training stages with validation data keep the weights of the lowest validation loss."""

import torch

from tinyllm.config import CheckpointConfig, ModelConfig, RuntimeConfig, TrainConfig
from tinyllm.model.transformer import Transformer
from tinyllm.train.distributed import TrainingRun
from tinyllm.train.loop import evaluate, fit
from tinyllm.train.objectives import NextTokenLoss

CPU = RuntimeConfig(device="cpu", threads=1)
VOCAB = 64


def _rows(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 4, 33), generator=g)
    return [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in ids]


TRAIN, VAL = _rows(0, 2), _rows(1, 4)  # two batches to memorise, four unseen ones: it overfits


def _endless(batches):
    while True:
        yield from batches


def _train(keep: str, run: TrainingRun | None = None, objective=None, max_steps: int = 120, patience: int = 0):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32,
                                    vocab_size=VOCAB))
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, lr=3e-3, min_lr=3e-3, warmup_steps=1, log_interval=5,
                      eval_interval=5, eval_batches=4, weight_decay=0.0, keep=keep, patience=patience)
    result = fit(model, objective or NextTokenLoss(), _endless(TRAIN), cfg, CPU, run=run,
                 val_batches=lambda: iter(VAL))
    return model, result


def _val_loss(model) -> float:
    return evaluate(model, NextTokenLoss(), iter(VAL), torch.device("cpu"), torch.float32)


def test_the_kept_weights_are_those_of_the_lowest_validation_loss():
    model, result = _train("best")
    curve = [h["val/loss"] for h in result.history]
    assert curve[-1] > min(curve) * 1.05  # the run did overfit
    assert _val_loss(model) <= min(curve) * 1.02
    assert result.final["kept_step"] == result.history[curve.index(min(curve))]["step"] < 120
    assert result.final["val/loss"] == result.final["val/best_loss"] == min(curve)
    assert result.final["val/last_loss"] == curve[-1]


def test_patience_stops_early_with_exactly_the_weights_the_full_run_keeps():
    full, full_result = _train("best")
    model, result = _train("best", patience=3)
    kept = full_result.final["kept_step"]
    assert result.history[-1]["step"] == result.steps == kept + 3 * 5 < 120  # three evaluations without a better loss
    assert full_result.steps == 120
    assert result.final["kept_step"] == kept and result.final["val/loss"] == full_result.final["val/loss"]
    for name, tensor in full.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_keep_last_keeps_the_last_weights():
    model, result = _train("last")
    assert result.final["kept_step"] == 120
    assert _val_loss(model) == result.history[-1]["val/loss"] == result.final["val/loss"]


class CrashAt:
    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls >= self.n:
            raise KeyboardInterrupt("killed")
        return NextTokenLoss()(model, batch)


def test_a_resumed_run_still_ends_on_the_best_weights_of_the_whole_run(tmp_path):
    """The best step comes before the crash; the resumed run must not forget it."""
    whole, expected = _train("best")
    run = TrainingRun(checkpoint=CheckpointConfig(interval=20, keep=1), checkpoint_dir=tmp_path / "ckpt")
    try:  # train calls the objective once per step and once per validation batch
        _train("best", run, CrashAt(130))
    except KeyboardInterrupt:
        pass
    saved = sorted((tmp_path / "ckpt").glob("step-*"))
    assert saved and int(saved[-1].name[5:]) > expected.final["kept_step"]  # it resumes past the best step
    resumed, result = _train("best", run)
    assert result.final["kept_step"] == expected.final["kept_step"]
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


def test_pretraining_that_patience_stops_counts_the_steps_it_took(tmp_path, tokenizer):
    """tokens_seen, epochs and the checkpoint's steps count the steps taken, not pretrain.max_steps:
    on random tokens the validation loss stops falling at once, and patience stops the run."""
    from tinyllm.config import parse_params
    from tinyllm.data.tokenizer import save_tokenizer
    from tinyllm.data.tokens import random_tokens
    from tinyllm.train.checkpoint import read_config
    from tinyllm.train.pretrain import run_pretrain

    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    tokens = random_tokens(tmp_path / "tokens", tokenizer.get_vocab_size(), {"train": 4000, "val": 400})
    params = parse_params({
        "runtime": {"device": "cpu", "threads": 1},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, "max_seq_len": 64},
        "pretrain": {"max_steps": 60, "batch_size": 4, "warmup_steps": 1, "log_interval": 2, "eval_interval": 2,
                     "eval_batches": 2, "patience": 1, "seq_len": 16}})
    summary = run_pretrain(params, tokens, tmp_path / "tokenizer", tmp_path / "out")
    steps = summary["kept_step"] + 2  # one evaluation after the best without a lower loss
    assert steps < 60
    assert summary["tokens_seen"] == steps * 4 * 16 and summary["epochs"] == steps * 4 * 16 / 4000
    assert read_config(tmp_path / "out")["steps"] == steps
