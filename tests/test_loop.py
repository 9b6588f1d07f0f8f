import math

import pytest
import torch

from tinyllm.config import RuntimeConfig, TrainConfig
from tinyllm.errors import NonFiniteLossError
from tinyllm.model.transformer import Transformer
from tinyllm.train.engine import build_optimizer
from tinyllm.train.loop import fit, lr_at
from tinyllm.train.objectives import NextTokenLoss

CPU = RuntimeConfig(device="cpu")


def random_batches(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, vocab, (2, 17), generator=gen)
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def train(tiny_config, **overrides):
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    cfg = TrainConfig(**{"max_steps": 12, "batch_size": 2, "warmup_steps": 2, "log_interval": 3, **overrides})
    return model, fit(model, NextTokenLoss(), random_batches(tiny_config.vocab_size), cfg, CPU)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_same_seed_same_losses_and_weights(tiny_config):
    model_a, a = train(tiny_config)
    model_b, b = train(tiny_config)
    assert [h["train/loss"] for h in a.history] == [h["train/loss"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert [h["step"] for h in a.history] == [3, 6, 9, 12]


def test_accumulation_matches_one_big_batch(tiny_config):
    """Two micro-batches of 2 with grad_accum=2 take the same step as one batch of 4."""
    torch.manual_seed(0)
    rows = torch.randint(0, tiny_config.vocab_size, (4, 17))
    big = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    cfg = dict(max_steps=1, warmup_steps=0, log_interval=1, grad_clip=0.0)
    torch.manual_seed(1)
    m1 = Transformer(tiny_config)
    fit(m1, NextTokenLoss(), iter([big]), TrainConfig(batch_size=4, **cfg), CPU)
    torch.manual_seed(1)
    m2 = Transformer(tiny_config)
    fit(m2, NextTokenLoss(), iter(halves), TrainConfig(batch_size=2, grad_accum=2, **cfg), CPU)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(m1.parameters(), m2.parameters()))


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_config):
    class PoisonAtStep5(NextTokenLoss):
        calls = 0

        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            self.calls += 1
            return (loss * math.nan if self.calls == 5 else loss), metrics

    torch.manual_seed(0)
    model = Transformer(tiny_config)
    cfg = TrainConfig(max_steps=12, batch_size=2, warmup_steps=2, log_interval=4)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 5"):
        fit(model, PoisonAtStep5(), random_batches(tiny_config.vocab_size), cfg, CPU)


def test_norms_are_not_weight_decayed(tiny_config):
    model = Transformer(tiny_config)
    decay, no_decay = build_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 2 * 2 + 1


def test_validation_loss_is_logged_at_eval_interval(tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    cfg = TrainConfig(max_steps=8, batch_size=2, warmup_steps=1, log_interval=2, eval_interval=4, eval_batches=2)
    result = fit(model, NextTokenLoss(), random_batches(tiny_config.vocab_size), cfg, CPU,
                 val_batches=lambda: random_batches(tiny_config.vocab_size, seed=9))
    assert [h["step"] for h in result.history if "val/loss" in h] == [4, 8]
    assert result.final["val/loss"] == result.history[-1]["val/loss"]
