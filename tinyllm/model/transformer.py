"""A Llama-style decoder: pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU — dense, or with a
DeepSeek-V2-style mixture of experts in place of the FFN (`model.moe`, tinyllm/model/ffn.py).

Weight names follow Hugging Face Llama (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `model.norm`, `lm_head`), with the rotate-half RoPE layout, so a state dict
exports to `LlamaForCausalLM` as a plain save and peft target names carry over.

    model = Transformer(ModelConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024))
    logits = model(input_ids)                       # (B, T, vocab)
    loss = model(input_ids, labels=labels).loss     # next-token cross-entropy
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.config import ModelConfig
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.model.ffn import MLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: under bf16 autocast the mean of squares loses too many bits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim) in the rotate-half layout (halves repeat).

    Computed with NumPy in float64, not torch: the model is built before a stage settles torch's
    math kernels (`cpu_threads.warm_up_math_kernels`), and torch's first cos or sin in a process,
    split between two CPU threads, sometimes gave one thread's half of the table 7e-9 off (3
    fresh processes of 40 on the 2-core VM), so the same params trained other weights. NumPy
    computes it on one thread, the same in every process (tests/test_model.py)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(max_len), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by position; cos/sin are (T, head_dim), or (B, 1, T,
    head_dim) when each row has positions of its own."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_heads, max_len, head_dim) each."""

    fold_query_groups = False
    """For masked attention with grouped heads: fold each group's query heads into rows
    (`Attention._folded_gqa_attention`) rather than use SDPA's grouped heads. On for the
    batch-invariant batcher's `SlotKVCache`, whose attention runs without cuDNN, and for a
    `StaticKVCache` in float32, where cuDNN's kernel does not run either."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (positions 0..length-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rope(self, table: torch.Tensor, T: int) -> torch.Tensor:
        """The RoPE table rows of the next T positions."""
        if self.length + T > table.shape[0]:
            raise ValueError(f"sequence of {self.length + T} tokens exceeds model.max_seq_len={table.shape[0]}")
        return table[self.length:self.length + T]

    def mask(self, T: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
        return attention_mask(self.length, T, key_valid, device)

    def advance(self, T: int) -> None:
        self.length += T


class StaticKVCache(KVCache):
    """A KV cache whose every step has the same shapes, so a decode step can be one CUDA graph.

    Attention always spans the whole buffer (positions beyond the current one are masked out),
    the position is a device tensor updated in place, and the buffers have fixed addresses
    (`mark_static_address`). Reusable: `reset()` starts a new sequence without clearing memory.
    """

    folded_dtypes = (torch.float32,)
    """The dtypes whose decode steps fold grouped heads (`fold_query_groups`). Every step here is
    masked (the whole buffer, positions ahead masked out), and on CUDA only cuDNN's kernel takes
    grouped heads with a mask. It takes no float32: there SDPA copied each layer's keys and values
    out to every query head, a quarter of an fp32 eval decode step's GPU time at 768x8, and folding
    took 0.9 s off a checkpoint. In bf16, where SDPA may use cuDNN's kernel (not profiled), folding
    made GRPO's rollouts 5-12% slower at 320 positions (reports/gpu_speed.md, "The fold in bf16")."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        super().__init__(cfg, batch_size, max_len, device, dtype)
        self.fold_query_groups = dtype in self.folded_dtypes
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.key_pos = torch.arange(max_len, device=device)
        for buffer in (*self.keys, *self.values, self.position):
            torch._dynamo.mark_static_address(buffer)

    def reset(self) -> None:
        self.position.zero_()

    def _positions(self, T: int) -> torch.Tensor:
        return self.position + self.key_pos[:T]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where = self._positions(k.shape[2])
        self.keys[layer].index_copy_(2, where, k)
        self.values[layer].index_copy_(2, where, v)
        return self.keys[layer], self.values[layer]

    def rope(self, table: torch.Tensor, T: int) -> torch.Tensor:
        return table[self._positions(T)]

    def mask(self, T: int, key_valid: torch.Tensor | None, device) -> torch.Tensor:
        """(B or 1, 1, T, max_len): causal over the whole buffer, padding out (see attention_mask)."""
        query_pos = self._positions(T)[:, None]
        causal = self.key_pos[None, :] <= query_pos
        if key_valid is None:
            return causal[None, None]
        return (causal & key_valid[:, None, None, :]) | (self.key_pos[None, :] == query_pos)[None, None]

    def advance(self, T: int) -> None:
        self.position += T


def attention_mask(start: int, T: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, start + T) mask for queries at positions start..start+T-1, or None
    for plain causal attention from position 0.

    Each query sees every earlier key (and itself) that `key_valid` marks as real. A padding query
    also sees itself, so its softmax row is never empty (an empty row gives NaN, which would leak
    into the real rows through the values).
    """
    if start == 0 and key_valid is None:
        return None
    query_pos = start + torch.arange(T, device=device)[:, None]
    key_pos = torch.arange(start + T, device=device)[None, :]
    causal = key_pos <= query_pos
    if key_valid is None:
        return causal[None, None]
    return (causal & key_valid[:, None, None, :start + T]) | (key_pos == query_pos)[None, None]


def packed_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed sequences (`segments`: (B, T), the sequence of each position): each
    position's index within its own sequence, (B, T), and the (B, 1, T, T) mask that lets a query
    see only the earlier keys of its own sequence."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = index - torch.where(starts, index, 0).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return positions, (segments[:, :, None] == segments[:, None, :])[:, None] & causal


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None  # no mask: queries and keys start together, plain causal attention
        grouped = self.n_kv_heads != self.n_heads
        fold = False
        if cache is not None:
            k, v = cache.update(layer, k, v)
            fold = mask is not None and grouped and cache.fold_query_groups
        elif mask is not None and grouped:
            # a masked forward over whole rows (packed sequences, padded prompts): CUDA's kernel for
            # arbitrary masks takes no grouped heads, so the key/value heads are shared out first
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            grouped = False
        if fold:
            y = self._folded_gqa_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=grouped,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _folded_gqa_attention(self, q, k, v, mask):
        """Masked attention of q (B, n_heads, T, hd) over a cache's grouped keys and values, each
        group's query heads viewed as more query rows of their key/value head, (B, n_kv_heads,
        group * T, hd); returns (B, n_heads, T, hd). The same sums as SDPA's `enable_gqa`, without
        it: on CUDA only cuDNN's kernel takes grouped heads with a mask, and without cuDNN (the
        batch-invariant server) SDPA's fallback copied every key and value head out to its query
        heads, most of a decode step's memory traffic (reports/serving.md: "the invariant server's
        attention without copies", 1.75x the tokens/s)."""
        B, _, T, hd = q.shape
        group = self.n_heads // self.n_kv_heads
        rows = q.reshape(B, self.n_kv_heads, group * T, hd)
        if mask.shape[2] > 1:  # each group's rows are its heads' T queries in turn, so the mask repeats
            mask = mask.repeat(1, 1, group, 1)
        y = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask)
        return y.reshape(B, self.n_heads, T, hd)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.moe.enabled and index >= cfg.moe.first_dense_layers
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.dim, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        """(new x, (balance loss, expert load) for an MoE layer, else None)."""
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask))
        if not self.is_moe:
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x))), None
        y, balance_loss, load = self.mlp(self.post_attention_layernorm(x))
        return x + self.dropout(y), (balance_loss, load)


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm: HF's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


@dataclass
class Output:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    """Next-token cross-entropy, plus the MoE balance loss when there are experts."""
    balance_loss: torch.Tensor | None = None
    """Sum over MoE layers of the expert-level balance loss (already inside `loss`)."""
    expert_load: torch.Tensor | None = None
    """(MoE layers, experts): share of routing assignments each expert got in this call."""
    token_loss_sum: torch.Tensor | None = None
    """The cross-entropy summed over the labelled positions (no balance loss)."""


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer before building a model")
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_head_and_build_rope_tables()
        self.apply(self._init_weights)
        # residual-branch outputs scaled down so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def tie_head_and_build_rope_tables(self) -> None:
        """What a checkpoint's weights leave out: the head tied to the embedding (when it is) and
        the RoPE tables. Again after `load_model` has put a file's tensors in place of the weights."""
        cfg = self.config
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # What peft reads to keep a tied lm_head tied when it trains rows of the embedding (the lora
    # stage's new tokens): the input embedding, the weights tied to it, and (ModelConfig.to_dict)
    # the flag saying they are tied.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def _tied_weights_keys(self) -> list[str] | None:
        return ["lm_head.weight"] if self.config.tie_embeddings else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, key_valid: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> Output:
        """Logits for every position, plus the mean next-token loss when `labels` is given.

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) target ids, IGNORE_INDEX where no loss is wanted.
            cache: a KVCache (or StaticKVCache) for incremental decoding; positions continue where
                the cache stands.
            key_valid: (B, ≥ start + T) bool, False at padding positions no query may attend to
                (left-padded prompts generated together). RoPE scores depend only on the distance
                between positions, so a row shifted right by its padding computes what it would alone.
            segments: (B, T) rows of packed sequences (`pack_sequences`): the sequence each position
                belongs to. Each sequence sees only itself and starts at position 0, so it gets the
                logits it would alone. Not with a cache.
        """
        T = input_ids.shape[1]
        if segments is not None and (cache is not None or key_valid is not None):
            raise ValueError("segments (packed rows) go without a cache and without key_valid")
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
            if segments is not None:
                positions, mask = packed_positions(segments)
                cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            else:
                cos, sin = self.rope_cos[:T], self.rope_sin[:T]
                mask = attention_mask(0, T, key_valid, input_ids.device)
        else:
            cos, sin = cache.rope(self.rope_cos, T), cache.rope(self.rope_sin, T)
            mask = cache.mask(T, key_valid, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        moe_stats = []
        for i, layer in enumerate(self.model.layers):
            x, stats = layer(x, cos, sin, cache, i, mask)
            if stats is not None:
                moe_stats.append(stats)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)
        balance_loss = sum(b for b, _ in moe_stats) if moe_stats else None
        load = torch.stack([l for _, l in moe_stats]) if moe_stats else None
        if labels is None:
            return Output(self.lm_head(x), None, balance_loss, load)
        logits = self.lm_head(x)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        labelled = (labels != IGNORE_INDEX).sum()
        loss = loss_sum / labelled  # NaN with no labelled position, as F.cross_entropy's mean gives
        if balance_loss is not None:
            loss = loss + balance_loss  # the balance loss trains the routers (MiniMind v1 dropped it)
        return Output(logits, loss, balance_loss, load, loss_sum)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the embedding table (and an
        untied lm_head), the convention of the 6·N FLOPs formula; active counts only the top_k
        routed experts a token goes through, not all of them."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        if active:
            moe = self.config.moe
            for layer in self.model.layers:
                if layer.is_moe:
                    routed = sum(p.numel() for p in layer.mlp.experts.parameters())
                    n -= routed - routed * moe.top_k // moe.n_routed_experts
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_active-non-embedding (matmuls fwd+bwd) + 12·L·d·T (attention)."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True, active=True) + 12 * cfg.n_layers * cfg.dim * seq_len
