"""The mixture of experts: dispatch equals a per-token reference, routing maths, balance, DDP."""

import os

import pytest
import torch
import torch.nn.functional as F

from tinyllm.config import ModelConfig, MoEConfig, RuntimeConfig, TrainConfig
from tinyllm.model.ffn import MoE
from tinyllm.model.transformer import Transformer
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss


def moe_config(**moe) -> ModelConfig:
    defaults = dict(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_dim=16,
                    first_dense_layers=1)
    return ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32, vocab_size=61,
                       moe=MoEConfig(**{**defaults, **moe}))


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the vectorized dispatch must equal."""
    flat = x.reshape(-1, x.shape[-1])
    chosen, weights, _ = moe.route(flat)
    e = moe.experts
    rows = []
    for t in range(flat.shape[0]):
        y = moe.shared_experts(flat[t]) if moe.shared_experts is not None else torch.zeros_like(flat[t])
        for k in range(chosen.shape[1]):
            i = int(chosen[t, k])
            h = F.silu(e.gate_proj[i] @ flat[t]) * (e.up_proj[i] @ flat[t])
            y = y + weights[t, k] * (e.down_proj[i] @ h)
        rows.append(y)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_vectorized_dispatch_equals_the_per_token_reference(grouped, scoring, monkeypatch):
    torch.manual_seed(0)
    moe = MoE(moe_config(scoring=scoring))
    monkeypatch.setattr("tinyllm.model.ffn.grouped_mm_supported", lambda x: grouped)
    x = torch.randn(3, 5, 32, requires_grad=True)
    out, _, _ = moe(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = naive_moe(moe, ref_x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    params = [moe.gate.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj,
              moe.shared_experts.up_proj.weight]
    fast = torch.autograd.grad(out, [x, *params], grad)
    slow = torch.autograd.grad(ref, [ref_x, *params], grad)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_top_k_weights_are_renormalised_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(10, 32)
    for norm in (True, False):
        moe = MoE(moe_config(norm_topk_prob=norm))
        chosen, weights, scores = moe.route(x)
        assert torch.equal(chosen, scores.topk(2, dim=-1).indices)
        if norm:
            torch.testing.assert_close(weights.sum(-1), torch.ones(10))
        else:
            torch.testing.assert_close(weights, scores.gather(-1, chosen))
            assert (weights.sum(-1) < 1).all()


def test_balance_loss_on_a_hand_example():
    moe = MoE(moe_config(n_routed_experts=2, top_k=1, aux_loss_coef=0.1, n_shared_experts=0))
    # 4 tokens, all routed to expert 0; router probabilities (0.75, 0.25) for each
    counts = torch.tensor([4, 0])
    scores = torch.tensor([[0.75, 0.25]] * 4)
    # f = E/(K·N)·counts = (2, 0); P = (0.75, 0.25); loss = 0.1 · (2·0.75 + 0·0.25) = 0.15
    assert moe._balance_loss(counts, scores).item() == pytest.approx(0.15)
    # a perfectly even router: f = (1, 1), P = (0.5, 0.5) → α · 1
    assert moe._balance_loss(torch.tensor([2, 2]), torch.full((4, 2), 0.5)).item() == pytest.approx(0.1)


def test_balance_loss_reaches_the_training_loss():
    torch.manual_seed(0)
    model = Transformer(moe_config(aux_loss_coef=1.0))
    ids = torch.randint(0, 61, (2, 16))
    out = model(ids, labels=ids)
    ce = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    assert out.balance_loss > 0
    torch.testing.assert_close(out.loss, ce + out.balance_loss)
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def _batches(n_rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (n_rows, 33), generator=g)
    while True:
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_a_tiny_moe_overfits_a_batch():
    torch.manual_seed(0)
    model = Transformer(moe_config())
    batch = next(_batches())
    assert model(batch["input_ids"], labels=batch["labels"]).loss > 3.5  # ≈ ln 61 at initialisation
    cfg = TrainConfig(max_steps=150, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=10, log_interval=50)
    result = fit(model, NextTokenLoss(), _batches(), cfg, RuntimeConfig(device="cpu"))
    assert result.final["train/loss"] < 0.5


def test_a_compiled_fp32_moe_trains_as_the_eager_one_does():
    """`runtime.compile: true` in fp32 on the CPU: the experts loop instead of the grouped matmul,
    whose compiled form wants bf16 (it stopped in Dynamo), and the losses follow the eager run's."""
    cfg = TrainConfig(max_steps=8, batch_size=8, lr=1e-2, warmup_steps=2, log_interval=4)
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = Transformer(moe_config(first_dense_layers=0))
        result = fit(model, NextTokenLoss(), _batches(), cfg, RuntimeConfig(device="cpu", dtype="float32",
                                                                            compile=compile, threads=1))
        losses.append([h["train/loss"] for h in result.history])
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)


def test_a_compiled_fp32_moe_compiles_the_same_graphs_whatever_its_weights_route():
    """The experts' loop reads the row counts back to the host. Compiled, it baked the first batch's
    counts into a graph, so a step compiled ahead from random weights (stages/compile_ahead.py) was
    not the step its stage compiled from trained ones. The loop runs eagerly between the graphs now."""
    tokens = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(1))

    def graphs_and_load(seed: int) -> tuple[list[str], torch.Tensor]:
        torch.manual_seed(seed)
        model = Transformer(moe_config(first_dense_layers=0))
        codes = []

        def record(graph, example_inputs):
            codes.append(graph.code)
            return graph.forward

        torch._dynamo.reset()
        out = torch.compile(model, backend=record)(tokens)
        assert torch.allclose(out.logits, model(tokens).logits, atol=1e-5)
        return codes, out.expert_load

    (codes, load), (other_codes, other_load) = graphs_and_load(0), graphs_and_load(1)
    assert not torch.equal(load, other_load)  # the two models route the batch differently
    assert codes and codes == other_codes


def test_load_stays_balanced_during_training():
    # Bound: with 8 experts and top-2, a router collapsing onto 2 experts gives max/mean = 4; the balance
    # loss should hold every expert within 2x of the mean share (random routing sits near 1.3 at this size).
    torch.manual_seed(0)
    model = Transformer(moe_config(n_routed_experts=8, top_k=2, aux_loss_coef=0.05))
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, log_interval=20)
    result = fit(model, NextTokenLoss(), _batches(seed=1), cfg, RuntimeConfig(device="cpu"))
    loads = [v for k, v in result.final.items() if "/expert" in k]
    assert len(loads) == 8 and sum(loads) == pytest.approx(1.0, abs=1e-4)
    assert max(loads) / (1 / 8) < 2.0
    assert "train/balance_loss" in result.final


def _ddp_step(rank: int, world_size: int, port: int, results):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = Transformer(moe_config())
    model.model.layers[1].mlp.expert_bias[3] = -1e9  # expert 3 is never chosen: it gets no token
    ddp = DistributedDataParallel(model)
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(rank))  # each rank its own data
    ddp(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    experts = model.model.layers[1].mlp.experts
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(world_size)]
    dist.all_gather(gathered, grads)
    results[rank] = (float(experts.gate_proj.grad[3].abs().sum()), float(experts.gate_proj.grad[0].abs().sum()),
                     all(torch.equal(gathered[0], g) for g in gathered))
    dist.destroy_process_group()


def test_ddp_step_with_an_expert_that_gets_no_token():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_step, args=(2, port, results), nprocs=2, join=True)
    for rank in (0, 1):
        idle, busy, synced = results[rank]
        assert idle == 0 and busy > 0 and synced


@torch.no_grad()
def _load(model, batch):
    model.eval()
    load = model(batch["input_ids"]).expert_load[0]
    model.train()
    return load


def test_aux_free_bias_balancing_undoes_a_collapsed_router():
    # DeepSeek-V3: no balance loss; a per-expert bias, nudged each step, decides selection only
    torch.manual_seed(0)
    model = Transformer(moe_config(n_routed_experts=8, top_k=2, scoring="sigmoid", bias_update_rate=0.02,
                                   aux_loss_coef=0.0))
    model.model.layers[1].mlp.expert_bias[:2] = 1.0  # experts 0 and 1 take every token
    batch = next(_batches())
    assert _load(model, batch)[:2].sum() == 1.0
    cfg = TrainConfig(max_steps=100, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=5, log_interval=50)
    fit(model, NextTokenLoss(), _batches(), cfg, RuntimeConfig(device="cpu"))
    load = _load(model, batch)
    assert load.max() * 8 < 2.0 and (load > 0).all()  # every expert back in use, none above 2× its share
