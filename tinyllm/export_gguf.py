"""GGUF export, for llama.cpp and Ollama, with no patches on their side.

    export_gguf(Path("artifacts/grpo"), Path("artifacts/gguf/tinyllm.gguf"))            # f16
    export_gguf(Path("artifacts/grpo"), Path("tinyllm-q8_0.gguf"), quantization="q8_0")

The file holds the weights under llama.cpp's `llama` architecture, the byte-level BPE tokenizer
(tokens, merges, special tokens as control tokens), the chat template, and `<|im_end|>` as the
end-of-sequence and end-of-turn token, so llama.cpp's chat stops where our engine stops. An Ollama
`Modelfile` is written beside it (`modelfile`).

The tokenizer's pre-split: ours isolates every Han character, then applies GPT-2's byte-level
regex; llama.cpp has no pre-tokenizer that isolates Han characters, and a GGUF cannot carry a
regex of its own. It is written as llama.cpp's "gpt-2" (the same GPT-2 regex, without the Han
split). That gives the same tokens because our merges never join a Han character to anything
else: they were learned with Han characters isolated. `tests/test_gguf.py` checks it in llama.cpp
on 1,000 strings.

Q and K projections are stored in llama.cpp's RoPE layout. Ours rotates the two halves of each
head (Llama's rotate-half), llama.cpp's `llama` rotates adjacent pairs, so each head's rows are
reordered (first half, second half interleaved), which is the same reordering llama.cpp's own
converter applies to a Hugging Face Llama.

An MoE is written as llama.cpp's `qwen2moe` when that computes it exactly: softmax routing, top-k
weights not renormalised, an MoE in every layer (`moe_mismatch` names what else differs). Its
shared expert sits behind a sigmoid gate; its weights are tiny (`SHARED_GATE`), so it is exactly
0.5, and the shared expert's down projection is written doubled (as in the transformers export). `qwen2moe`
rotates halves, like us, so Q and K keep their order there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tinyllm.config import ModelConfig
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, load_tokenizer, special_id
from tinyllm.errors import UserError
from tinyllm.train.checkpoint import is_checkpoint, load_model

QUANTIZATIONS = ("f16", "q8_0", "f32")


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim, dim) rows of a Q or K projection, reordered within each head from
    rotate-half order (x0..x_{h/2-1}, x_{h/2}..x_{h-1}) to adjacent pairs (x0, x_{h/2}, x1, ...)."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (Hugging Face Llama) weight names → llama.cpp's `llama` (dense) or `qwen2moe` (MoE), with
    Q/K in `llama`'s RoPE layout."""
    moe = cfg.moe.enabled
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not cfg.tie_embeddings or moe:  # qwen2moe needs its own output matrix, tied or not
        out["output.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm"}
    if not moe:
        names |= {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}."
        for ours, theirs in names.items():
            weight = state[f"{layer}{ours}.weight"]
            if ours == "self_attn.q_proj" and not moe:
                weight = interleave_rope_rows(weight, cfg.n_heads)
            elif ours == "self_attn.k_proj" and not moe:
                weight = interleave_rope_rows(weight, cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}.weight"] = weight
        if moe:
            out |= _qwen2moe_ffn(state, cfg, i)
    return out


SHARED_GATE = 1e-20
"""The shared expert's gate weights. llama.cpp computes its sigmoid as silu(g)/g, which is 0/0 at
g = 0, so the gate cannot be exactly 0; at g = 1e-20 · sum(x), exp(-g) rounds to 1 in fp32 and
the gate is exactly 0.5 (unless a token's features sum to below 1e-18)."""


def _qwen2moe_ffn(state: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """Layer i's router, routed experts (stacked (experts, out, in)) and gated shared expert."""
    mlp, blk = f"model.layers.{i}.mlp.", f"blk.{i}."
    out = {blk + "ffn_gate_inp.weight": state[mlp + "gate.weight"],
           blk + "ffn_gate_exps.weight": state[mlp + "experts.gate_proj"],
           blk + "ffn_up_exps.weight": state[mlp + "experts.up_proj"],
           blk + "ffn_down_exps.weight": state[mlp + "experts.down_proj"],
           blk + "ffn_gate_inp_shexp.weight": torch.full((cfg.dim,), SHARED_GATE)}
    width = state[mlp + "experts.gate_proj"].shape[1]
    for proj, shape in (("gate", (width, cfg.dim)), ("up", (width, cfg.dim)), ("down", (cfg.dim, width))):
        shared = state.get(f"{mlp}shared_experts.{proj}_proj.weight")
        if shared is None:  # no shared expert: one of zeros, which adds exactly 0
            shared = torch.zeros(shape)
        out[f"{blk}ffn_{proj}_shexp.weight"] = shared * (2.0 if proj == "down" else 1.0)  # undoes the 0.5
    return out


def moe_mismatch(cfg: ModelConfig) -> str:
    """How our MoE differs from llama.cpp's nearest architecture, Qwen2-MoE (softmax over all experts,
    top-k weighed by their probabilities, never renormalised, an MoE in every layer, a shared expert
    behind a sigmoid gate; its DeepSeek architectures use MLA attention)."""
    m, differ = cfg.moe, []
    if m.scoring != "softmax":
        differ.append(f"it routes with {m.scoring} scores, llama.cpp's Qwen2-MoE with a softmax")
    if m.norm_topk_prob:
        differ.append("it renormalises the top-k routing weights (model.moe.norm_topk_prob), llama.cpp's "
                      "Qwen2-MoE never does")
    if m.first_dense_layers:
        differ.append(f"its first {m.first_dense_layers} layer(s) are dense (model.moe.first_dense_layers), "
                      "llama.cpp's Qwen2-MoE has an MoE in every layer")
    if cfg.n_heads * cfg.head_dim != cfg.dim:
        differ.append(f"its attention width ({cfg.n_heads} heads x {cfg.head_dim}) is not model.dim={cfg.dim}, "
                      "which llama.cpp's Qwen2-MoE assumes")
    return "; ".join(differ)


def export_gguf(ckpt_dir: Path, out_file: Path, quantization: str = "f16") -> Path:
    """Write `out_file` (a GGUF file) and a `Modelfile` beside it. quantization: f16 (matrices in
    fp16, norms and the MoE router in fp32), q8_0 or f32."""
    import gguf

    ckpt_dir, out_file = Path(ckpt_dir), Path(out_file)
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    if not is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint folder (expected config.json and model.safetensors)")
    model = load_model(ckpt_dir)
    cfg = model.config
    if cfg.moe.enabled:
        if moe_mismatch(cfg):
            raise UserError(f"{ckpt_dir}: llama.cpp cannot run this MoE exactly: {moe_mismatch(cfg)}. "
                            "Export it with `tinyllm export` (transformers) instead")
        if any(b.abs().max() > 0 for n, b in model.named_buffers() if n.endswith("expert_bias")):
            raise UserError(f"{ckpt_dir}: expert selection biases are set; llama.cpp's Qwen2-MoE has none")
    tok = load_tokenizer(ckpt_dir)
    tmp = out_file.with_name(out_file.name + ".tmp")  # written whole, then moved into place
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), "qwen2moe" if cfg.moe.enabled else "llama")
    writer.add_name(ckpt_dir.name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.moe.enabled:
        width = model.state_dict()["model.layers.0.mlp.experts.gate_proj"].shape[1]
        writer.add_expert_count(cfg.moe.n_routed_experts)
        writer.add_expert_used_count(cfg.moe.top_k)
        writer.add_expert_feed_forward_length(width)
        writer.add_expert_shared_feed_forward_length(max(1, cfg.moe.n_shared_experts) * width)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tok, cfg.vocab_size, ckpt_dir)
    for name, tensor in gguf_tensors(model.state_dict(), cfg).items():
        data = tensor.detach().float().numpy()
        if data.ndim == 1 or quantization == "f32" or name.endswith("ffn_gate_inp.weight"):  # routing stays fp32
            writer.add_tensor(name, data)
        elif quantization == "f16" or data.shape[-1] % 32:  # q8_0 blocks are 32 values of a row
            writer.add_tensor(name, data.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    (out_file.parent / "Modelfile").write_text(modelfile(out_file.name), encoding="utf-8")
    return out_file


def _add_tokenizer(writer, tok, vocab_size: int, ckpt_dir: Path) -> None:
    import gguf

    vocab = tok.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > vocab_size:
        raise UserError(f"{ckpt_dir}: the tokenizer's ids are not 0..{len(vocab) - 1} within the model's "
                        f"vocabulary of {vocab_size}")
    tokens = [""] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size  # rows beyond the tokenizer (none with our trainer)
    special = {index for index, token in tok.get_added_tokens_decoder().items() if token.special}  # ChatML's, reserved
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    for index in range(len(vocab), vocab_size):
        tokens[index] = f"[PAD{index}]"
    model = json.loads(tok.to_str())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # see the module docstring: our Han split changes no token
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    end = special_id(tok, IM_END)
    writer.add_bos_token_id(special_id(tok, ENDOFTEXT))
    writer.add_eos_token_id(end)
    writer.add_eot_token_id(end)
    writer.add_pad_token_id(special_id(tok, ENDOFTEXT))
    writer.add_add_bos_token(False)  # our prompts start with no BOS
    writer.add_chat_template((ckpt_dir / "chat_template.jinja").read_text(encoding="utf-8"))


def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile: the weights, our chat format in Ollama's template syntax, and its stop token."""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n"""\n'
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "<|endoftext|>"\n')
