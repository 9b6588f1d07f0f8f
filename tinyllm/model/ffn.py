"""Feed-forward blocks: the dense SwiGLU, and a DeepSeek-V2-style mixture of experts
(fine-grained routed experts plus always-on shared experts).

The router scores every token against n_routed_experts and picks top_k; their SwiGLU outputs,
weighted by the scores, add to the shared experts' output (one SwiGLU of n_shared_experts ×
expert_hidden_dim, as DeepSeek fuses them).

Dispatch is drop-less and vectorized: the (token, expert) assignments are sorted by expert, all
experts run as one grouped matmul per projection (`F.grouped_mm`), and the results are put back
in token order and weighted. Nothing on this path reads a value back to the host.

Balance. The expert-level auxiliary loss of DeepSeek-V2,
    L_bal = α · Σ_i f_i · P_i,   f_i = E/(K·N) · (tokens routed to i),   P_i = mean score of i,
is 1·α for a perfectly even router and E·α at worst; the model adds it to the training loss.
With `scoring: sigmoid` and `bias_update_rate > 0`, DeepSeek-V3's aux-loss-free balancing instead
nudges a per-expert bias that affects which experts are chosen, never the weights they get.

    ffn = MLP(dim, hidden)                       # y = ffn(x)
    moe = MoE(cfg)                               # y, balance_loss, load = moe(x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.config import ModelConfig

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
"""One kernel for many matmuls of different row counts: public from torch 2.10, private before."""


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether the grouped matmul runs for x: in bf16 on CPU or CUDA (its CUDA kernels need bf16,
    SM ≥ 80), and in any dtype on the CPU, but there only eagerly: compiled, its shape check
    wants bf16 on the CPU too (an fp32 MoE under `runtime.compile: true` stopped in Dynamo)."""
    if GROUPED_MM is None:
        return False
    if x.dtype == torch.bfloat16:
        return x.device.type in ("cpu", "cuda")
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class RoutedExperts(nn.Module):
    """n SwiGLU experts with stacked weights, each laid out like a Linear's: (n, out, in)."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)  # as nn.Linear weights are initialised in Transformer

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
        """x: (M, dim) rows sorted by expert; counts: (n,) rows per expert → (M, dim).

        grouped: force the grouped-matmul path (True) or the per-expert loop (False); None picks.
        """
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate_w, up_w, down_w = (w.to(x.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        if grouped if grouped is not None else grouped_mm_supported(x):
            offsets = counts.cumsum(0).to(torch.int32)

            def mm(a, w):  # a @ w[e].T for each expert's rows
                return GROUPED_MM(a, w.transpose(-2, -1), offs=offsets)

            return mm(F.silu(mm(x, gate_w)) * mm(x, up_w), down_w)
        return expert_by_expert(x, counts, gate_w, up_w, down_w)


@torch.compiler.disable
def expert_by_expert(x, counts, gate_w, up_w, down_w):
    """The fallback where the grouped matmul does not run (CUDA fp32, compiled fp32 on the CPU): one
    matmul per expert, reading the counts back to the host. Never compiled: compiled, the loop baked
    the first batch's row counts into its graph, so a step compiled ahead from random weights
    (stages/compile_ahead.py) never matched the one its stage compiled from trained ones."""
    out = [F.linear(F.silu(F.linear(rows, gate_w[e])) * F.linear(rows, up_w[e]), down_w[e])
           for e, rows in enumerate(x.split(counts.tolist()))]
    return torch.cat(out)


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)): the dense FFN, and the shared experts of an MoE."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.cfg = m
        hidden = m.expert_hidden_dim or cfg.ffn_dim // 4
        self.gate = nn.Linear(cfg.dim, m.n_routed_experts, bias=False)  # the router
        self.experts = RoutedExperts(m.n_routed_experts, cfg.dim, hidden)
        self.shared_experts = MLP(cfg.dim, m.n_shared_experts * hidden) if m.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(m.n_routed_experts))  # aux-loss-free balancing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, dim) tokens → (top-k expert ids (N, K), their weights (N, K), all scores (N, E))."""
        m = self.cfg
        logits = F.linear(x.float(), self.gate.weight.float())  # routing in fp32
        scores = logits.softmax(-1) if m.scoring == "softmax" else logits.sigmoid()
        chosen = (scores + self.expert_bias).topk(m.top_k, dim=-1).indices  # the bias picks, never weighs
        weights = scores.gather(-1, chosen)
        if m.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return chosen, weights, scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, dim) → (output (B, T, dim), balance loss (scalar), load: share of assignments per expert (E,))."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, K, E = x.shape[0], self.cfg.top_k, self.cfg.n_routed_experts
        chosen, weights, scores = self.route(x)
        flat = chosen.flatten()  # (N·K,) expert of each assignment
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        y = self.experts(x[order // K], counts)  # rows sorted by expert
        y = y.new_empty(y.shape).index_copy_(0, order, y)  # back to (token, k) order
        out = (y.view(N, K, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training and self.cfg.bias_update_rate > 0:
            self._update_bias(counts)
        load = (counts.float() / (N * K)).detach()
        return out.view(shape).to(x.dtype), self._balance_loss(counts, scores), load

    def _balance_loss(self, counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        m = self.cfg
        if m.aux_loss_coef == 0:
            return torch.zeros((), device=scores.device)
        f = counts.float() * m.n_routed_experts / (m.top_k * scores.shape[0])
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)  # for sigmoid scores too
        return m.aux_loss_coef * (f * p).sum()

    @torch.no_grad()
    def _update_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3: raise the bias of underloaded experts, lower overloaded ones (same on every rank)."""
        load = counts.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
