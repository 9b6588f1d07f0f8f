"""Hugging Face `transformers` export and import: a dense checkpoint is a stock `LlamaForCausalLM`,
an MoE one a stock `Qwen2MoeForCausalLM`.

    export_hf(Path("artifacts/dpo"), Path("hf/tinyllm"))              # loads with AutoModelForCausalLM,
    export_hf(Path("artifacts/sft"), Path("hf/sft"), adapter=Path("artifacts/lora/adapter"))  # + peft
    import_hf(Path("hf/tinyllm"), Path("artifacts/imported"))         # and back, to keep training

Our weights already carry Llama's names and RoPE layout (rotate-half), so a dense export is a config
translation plus a copy; no `trust_remote_code`.

Why Qwen2-MoE for the MoE: among transformers' stock MoE models it is the one whose math is exactly
ours with softmax routing: fp32 softmax over all experts, top-k, optional renormalisation,
SwiGLU experts, dense first layers (`mlp_only_layers`), GQA attention without biases
(`qkv_bias: false`), rotate-half RoPE. Its shared expert sits behind a sigmoid gate; with that
gate's weights at 0 the gate is exactly 0.5, so the shared expert's down projection is exported
doubled (exact in fp32). DeepSeek-V2/V3 use MLA attention, GLM-4-MoE a partial rotary; they are
not ours. Sigmoid scoring (DeepSeek-V3 style) has no exact stock match and is refused.

`generation_config.json` names `<|im_end|>` and `<|endoftext|>` as end tokens, so `generate()` stops
where our engine stops.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from tinyllm.config import ModelConfig, MoEConfig
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, load_tokenizer, special_id
from tinyllm.errors import UserError
from tinyllm.folders import replaced_folder
from tinyllm.train.checkpoint import TOKENIZER_FILES, is_checkpoint, load_model, read_config, save_checkpoint

ADAPTER_DIR = "adapter"


def llama_config(cfg: ModelConfig, bos_id: int, eos_ids: list[int], pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"], dtype="float32",
    )


def qwen2_moe_config(cfg: ModelConfig, width: int, bos_id: int, eos_ids: list[int], pad_id: int):
    """Qwen2-MoE's config for our MoE whose experts are `width` wide."""
    from transformers import Qwen2MoeConfig

    m = cfg.moe
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", qkv_bias=False, use_sliding_window=False,
        num_experts=m.n_routed_experts, num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob,
        moe_intermediate_size=width, shared_expert_intermediate_size=max(1, m.n_shared_experts) * width,
        decoder_sparse_step=1, mlp_only_layers=list(range(m.first_dense_layers)),
        router_aux_loss_coef=m.aux_loss_coef, bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id,
        architectures=["Qwen2MoeForCausalLM"], dtype="float32",
    )


def check_moe_exportable(model, ckpt_dir: Path) -> None:
    m = model.config.moe
    if m.scoring != "softmax":
        raise UserError(f"{ckpt_dir}: model.moe.scoring={m.scoring!r}; only softmax routing maps exactly onto a "
                        "stock transformers MoE (Qwen2-MoE)")
    biased = [n for n, b in model.named_buffers() if n.endswith("expert_bias") and b.abs().max() > 0]
    if biased:
        raise UserError(f"{ckpt_dir}: expert selection biases are set ({biased[0]}, ...); Qwen2-MoE has none")


def moe_to_qwen2(state: dict, cfg: ModelConfig, width: int) -> dict:
    """Our MoE weights under Qwen2-MoE's names and layout (see the module docstring)."""
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition("mlp.")
        if not prefix or "mlp.experts." not in name and "mlp.shared_experts." not in name:
            out[name] = tensor
        elif leaf == "experts.gate_proj":
            out[f"{prefix}mlp.experts.gate_up_proj"] = torch.cat([tensor, state[f"{prefix}mlp.experts.up_proj"]], 1)
        elif leaf == "experts.down_proj":
            out[f"{prefix}mlp.experts.down_proj"] = tensor
        elif leaf.startswith("shared_experts."):
            scale = 2.0 if leaf.startswith("shared_experts.down_proj") else 1.0  # undoes the gate's sigmoid(0)
            out[f"{prefix}mlp.shared_expert.{leaf.removeprefix('shared_experts.')}"] = tensor * scale
    for i in range(cfg.moe.first_dense_layers, cfg.n_layers):
        prefix = f"model.layers.{i}.mlp."
        out[prefix + "shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
        if not cfg.moe.n_shared_experts:  # no shared expert: one of all zeros, which adds exactly 0
            for proj, shape in (("gate_proj", (width, cfg.dim)), ("up_proj", (width, cfg.dim)),
                                ("down_proj", (cfg.dim, width))):
                out[f"{prefix}shared_expert.{proj}.weight"] = torch.zeros(shape)
    return out


def qwen2_to_moe(state: dict, cfg: ModelConfig) -> dict:
    """The inverse of `moe_to_qwen2`, from the file layout transformers writes: one tensor per
    expert (`mlp.experts.<j>.gate_proj.weight`), which it fuses only in memory."""
    out, per_expert = {}, {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition("mlp.")
        if expert := re.fullmatch(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", leaf):
            per_expert.setdefault(f"{prefix}mlp.experts.{expert[2]}", {})[int(expert[1])] = tensor
        elif leaf.startswith("shared_expert."):
            if cfg.moe.n_shared_experts:
                scale = 0.5 if leaf.startswith("shared_expert.down_proj") else 1.0  # the export doubled it
                out[f"{prefix}mlp.shared_experts.{leaf.removeprefix('shared_expert.')}"] = tensor * scale
        elif not leaf.startswith("shared_expert_gate"):
            out[name] = tensor
    for name, experts in per_expert.items():
        out[name] = torch.stack([experts[j] for j in range(len(experts))])
    return out


def check_replaceable(out_dir: Path, source: Path, earlier_output) -> None:
    """UserError unless writing a model to `out_dir` may delete what is there: it must be new, empty
    or what this command wrote before (`earlier_output(folder)`), not a symbolic link, and neither
    `source`, a folder holding it, nor the `.tmp`/`.old` siblings the write goes through."""
    out, src = out_dir.resolve(), source.resolve()
    scratch = [out.with_name(out.name + suffix) for suffix in (".tmp", ".old")]
    if any(folder == src or folder in src.parents for folder in (out, *scratch)):
        raise UserError(f"{out_dir}: writing there would delete {source}, which it is made from; choose another folder")
    if out_dir.is_symlink():
        raise UserError(f"{out_dir}: a symbolic link; name the folder itself")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or earlier_output(out))):
        raise UserError(f"{out_dir}: exists and is not an earlier output of this command, and writing there "
                        "would delete it; choose a new or empty folder")


def _config_has(folder: Path, key: str) -> bool:
    try:
        return key in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _is_hf_export(folder: Path) -> bool:
    return _config_has(folder, "architectures")


def _is_native_checkpoint(folder: Path) -> bool:
    return is_checkpoint(folder) and _config_has(folder, "model")


def export_hf(ckpt_dir: Path, out_dir: Path, adapter: Path | None = None, metrics: dict | None = None) -> Path:
    """Write `out_dir` as a transformers model folder (and `out_dir/adapter` for a peft adapter),
    replacing an earlier export there, and nothing else (`check_replaceable`)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint folder (expected config.json and model.safetensors)")
    check_replaceable(out_dir, ckpt_dir, _is_hf_export)
    if adapter is not None:
        check_replaceable(out_dir, Path(adapter), _is_hf_export)
    model = load_model(ckpt_dir)
    cfg = model.config
    tok = load_tokenizer(ckpt_dir)
    bos, im_end, pad = special_id(tok, ENDOFTEXT), special_id(tok, IM_END), special_id(tok, ENDOFTEXT)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("expert_bias")}
    if cfg.moe.enabled:
        from transformers import Qwen2MoeForCausalLM

        check_moe_exportable(model, ckpt_dir)
        width = next(t.shape[1] for n, t in state.items() if n.endswith("mlp.experts.gate_proj"))  # (E, width, dim)
        architecture, hf_config = Qwen2MoeForCausalLM, qwen2_moe_config(cfg, width, bos, [im_end, bos], pad)
        state = moe_to_qwen2(state, cfg, width)
    else:
        architecture, hf_config = LlamaForCausalLM, llama_config(cfg, bos, [im_end, bos], pad)
    with torch.device("meta"):  # shapes only; ours take their places (random ones first: 0.6-1 s more at 768x8)
        hf = architecture(hf_config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise ValueError(f"weights do not map onto {type(hf).__name__} (missing {missing}, unexpected {unexpected})")
    with replaced_folder(out_dir) as tmp:
        hf.save_pretrained(tmp)
        generation = GenerationConfig(bos_token_id=bos, eos_token_id=[im_end, bos], pad_token_id=pad, do_sample=False)
        generation.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (ckpt_dir / name).exists():
                shutil.copy2(ckpt_dir / name, tmp / name)
        if adapter is not None:
            export_adapter(Path(adapter), tmp, out_dir, moe=cfg.moe.enabled)
        (tmp / "README.md").write_text(model_card(ckpt_dir, cfg, metrics), encoding="utf-8")
    return out_dir


def export_adapter(adapter: Path, out_dir: Path, base_dir: Path, moe: bool = False) -> None:
    """Write a peft adapter to `out_dir/adapter`, pointing at `base_dir`.

    Our module names are Llama's, so a dense model's adapter applies as it is. For an MoE exported
    as Qwen2-MoE, adapters on the shared experts follow their new name (`shared_expert`), and the
    down projection's B is doubled like its weight (see the module docstring).
    """
    from safetensors.torch import load_file, save_file

    config_file = adapter / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{adapter}: not a peft adapter folder (expected adapter_config.json)")
    target = out_dir / ADAPTER_DIR
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(adapter, target)
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    weights_file = target / "adapter_model.safetensors"
    if moe and weights_file.exists():
        weights = {}
        for name, tensor in load_file(str(weights_file)).items():
            name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            weights[name] = tensor * 2 if ".mlp.shared_expert.down_proj.lora_B" in name else tensor
        save_file(weights, str(weights_file), metadata={"format": "pt"})


def model_card(ckpt_dir: Path, cfg: ModelConfig, metrics: dict | None) -> str:
    meta = read_config(ckpt_dir)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        f"# TinyLLM ({meta.get('stage', 'model')})", "",
        ("A small Llama-style model trained from scratch with the TinyLLM pipeline "
         "(pretrain → SFT → LoRA → DPO → GRPO). Loads as a stock "
         f"`{'Qwen2MoeForCausalLM' if cfg.moe.enabled else 'LlamaForCausalLM'}`:"), "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'ids = tok.apply_chat_template([{"role": "user", "content": "你是谁？"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=False)',
        "print(tok.decode(model.generate(ids, max_new_tokens=40)[0, ids.shape[1]:], skip_special_tokens=True))",
        "```", "", "## Model", "",
        "| param | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in [("dim", cfg.dim), ("layers", cfg.n_layers), ("heads", cfg.n_heads),
                                        ("kv heads", cfg.n_kv_heads), ("ffn", cfg.ffn_dim),
                                        ("context", cfg.max_seq_len), ("vocab", cfg.vocab_size),
                                        ("rope theta", cfg.rope_theta), ("tied embeddings", cfg.tie_embeddings)]],
    ]
    if meta.get("train"):
        lines += ["", f"## Training ({meta.get('stage')})", "", "| param | value |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in meta["train"].items()]]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]]
    return "\n".join(lines) + "\n"


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """A transformers folder back into a native checkpoint: a Llama (ours or compatible), or a
    Qwen2-MoE that this module exported."""
    from safetensors.torch import load_file

    from tinyllm.model.transformer import Transformer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_file = hf_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not a transformers model folder")
    check_replaceable(out_dir, hf_dir, _is_native_checkpoint)
    hf = json.loads(config_file.read_text())
    if not {"LlamaForCausalLM", "Qwen2MoeForCausalLM"} & set(hf.get("architectures") or []):
        raise UserError(f"{config_file}: architectures {hf.get('architectures')}; only LlamaForCausalLM and "
                        "(our exported) Qwen2MoeForCausalLM import")
    state = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if not state:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights")
    cfg = native_config(hf, config_file, state)
    if cfg.moe.enabled:
        state = qwen2_to_moe(state, cfg)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - {"lm_head.weight" if cfg.tie_embeddings else ""} - {
        n for n in missing if n.endswith("expert_bias")}
    if unexpected or missing:
        raise UserError(f"{hf_dir}: weights do not match this config (missing {sorted(missing)}, "
                        f"unexpected {sorted(unexpected)})")
    save_checkpoint(model, out_dir, meta={"stage": "import", "source": str(hf_dir)}, tokenizer_dir=hf_dir)
    return out_dir


def native_config(hf: dict, config_file: Path, state: dict) -> ModelConfig:
    """Our ModelConfig for a transformers config, refusing what our model cannot compute exactly."""
    arch = hf.get("architectures") or []
    rope = hf.get("rope_parameters") or {}
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    problems = [name for name, bad in [
        ("attention_bias", hf.get("attention_bias") or hf.get("qkv_bias")), ("mlp_bias", hf.get("mlp_bias")),
        ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
        ("rope scaling", rope.get("rope_type", "default") != "default" or hf.get("rope_scaling")),
        ("head_dim", hf.get("head_dim") not in (None, head_dim)),
        ("sliding window", hf.get("use_sliding_window"))] if bad]
    moe = MoEConfig()
    if "Qwen2MoeForCausalLM" in arch:
        dense = list(hf.get("mlp_only_layers") or [])
        gates = [t for n, t in state.items() if n.endswith("shared_expert_gate.weight")]
        if dense != list(range(len(dense))) or hf.get("decoder_sparse_step", 1) != 1:
            problems.append("MoE layers other than 'all after the first k'")
        if any(g.abs().max() > 0 for g in gates):
            problems.append("a trained shared-expert gate (only our exports, with the gate at 0, import exactly)")
        width, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
        has_shared = any(t.abs().max() > 0 for n, t in state.items() if ".shared_expert." in n)
        if has_shared and shared % width:
            problems.append("a shared expert that is not a whole number of experts wide")
        moe = MoEConfig(enabled=True, n_routed_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                        n_shared_experts=shared // width if has_shared else 0, expert_hidden_dim=width,
                        norm_topk_prob=hf.get("norm_topk_prob", False), first_dense_layers=len(dense),
                        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))
    if problems:
        raise UserError(f"{config_file}: {', '.join(problems)} not supported by our model")
    return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                       hidden_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                       norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
                       vocab_size=hf["vocab_size"], moe=moe)
