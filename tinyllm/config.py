"""Typed params: one frozen dataclass per `params.yaml` section, validated once at load.

`load_params("params.yaml")` reads the file, rejects unknown keys, wrong types and impossible
combinations, and raises one `ConfigError` listing every problem by its dotted param name.
Past that point the code trusts the config. Example:

    cfg = load_params("params.yaml")
    cfg.model.head_dim      # derived once, here
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tinyllm.data.format_names import KIND_FORMATS
from tinyllm.errors import ConfigError

ARITHMETIC_ANSWERS = ("steps", "direct")
"""How SFT may answer a sum (WorldConfig.arithmetic_answer; tinyllm/data/chat_data.py)."""


@dataclass(kw_only=True, frozen=True)
class WorldConfig:
    n_people: int = 300
    """People in the fictional world; each gets a name and five attributes."""
    bios_per_person: int = 6
    """Differently worded biographies per person in the pretraining corpus."""
    english_fraction: float = 0.15
    """Share of biographies written in English instead of Chinese."""
    n_arithmetic: int = 1500
    """Small arithmetic sentences ("3加5等于8") added to the corpus."""
    arithmetic_answer: str = "steps"
    """One of ARITHMETIC_ANSWERS, how SFT answers a sum: "steps" counts to the result
    ("3加5等于几？" → "5 3 4 4 … 0 8。"), "direct" gives it at once as the corpus does
    (tinyllm/data/chat_data.py, reports/grpo.md)."""
    heldout_fraction: float = 0.2
    """People whose question/answer pairs later stay out of SFT data (they are only read)."""


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    source: str = "world"
    """`world` generates the embedded fictional world; `files` reads the corpora below."""
    pretrain: list = field(default_factory=list)
    """Paths or globs of pretraining text, `{"text": ...}` per line (MiniMind pretrain, Seq-Monkey)."""
    sft: list = field(default_factory=list)
    """Paths or globs of chat data: MiniMind SFT, ShareGPT, Alpaca or deepctrl (tinyllm/data/formats.py)."""
    identity: list = field(default_factory=list)
    """Paths or globs of the conversations the lora stage teaches (MiniMind's lora_identity.jsonl;
    any chat format); empty: the lora stage has nothing to teach, so set lora.enabled to false."""
    dpo: list = field(default_factory=list)
    """Paths or globs of preference pairs, `{"chosen": [msgs], "rejected": [msgs]}` (MiniMind DPO)."""
    grpo: list = field(default_factory=list)
    """Paths or globs of prompts with checkable answers for the grpo stage: GSM8K lines
    (`{"question", "answer": "...#### 42"}`) or `{"messages", "answer", "kind"?}`; a share is held
    out for eval's arith_heldout / arith_pass8. Empty: the grpo stage writes a note only."""
    format: str = "auto"
    """`auto` tells each file's format from its first good line's keys; or one format for every
    data.sft file (the other kinds are always told apart by their keys)."""
    strict: bool = False
    """False: a malformed line is counted, logged as file:line and skipped; True: it stops the run."""
    min_chars: int = 1
    """Documents and conversations with fewer characters are dropped."""
    max_chars: int = 0
    """... and with more (0: no limit)."""
    dedup: bool = True
    """Drop exact duplicates (after conversion), by a 64-bit hash of the content."""
    heldout_share: float = 0.05
    """Share of the SFT conversations (single- and multi-turn apart), and of a user's preference
    pairs, held out of training: eval scores every stage on them, and SFT keeps its best weights by them."""
    heldout_min: int = 20
    """... but at least this many of each (never more than half)."""
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass(kw_only=True, frozen=True)
class TokenizerConfig:
    vocab_size: int = 1024
    """The vocabulary's size, special tokens included: BPE's tokens, then reserved ones where BPE
    found fewer, so the model's shape follows from params (tinyllm/data/tokenizer.py)."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    split_han: bool = True
    """Pre-split every Han character so BPE cannot fuse name+template+value into one token
    (on a small templated Chinese corpus, plain BPE learned "住在石家庄" as one token, and the
    model learned facts about as well as by rote: 17% held-out QA against 97% with the split)."""
    split_digits: int = 0
    """Numbers of at most this many digits are spelled one token per digit (0: none): "12加7等于19"
    then reads column by column, and longer numbers (years) keep their BPE merges. Measured on the
    embedded world (reports/grpo.md): no run with split digits (2, or every digit) kept the facts
    the default reaches, and held-out sums did not become learnable enough to pay for it."""
    max_corpus_bytes: int = 0
    """Train on an even sample of about this many bytes of the corpus (every k-th document);
    0: all of it. BPE training holds its word counts in memory, so a multi-GB corpus needs a cap."""


@dataclass(kw_only=True, frozen=True)
class TokenizeConfig:
    val_fraction: float = 0.05
    """Share of documents routed to the validation split."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file before a new one is started."""
    batch_docs: int = 1024
    """Documents encoded per parallel batch."""


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """DeepSeek-V2-style mixture of experts in place of the dense FFN (tinyllm/model/ffn.py)."""

    enabled: bool = False
    """Replace the FFN of every layer after the first `first_dense_layers` with an MoE."""
    n_routed_experts: int = 8
    """Experts the router chooses among."""
    n_shared_experts: int = 1
    """Experts every token always goes through (fused into one SwiGLU)."""
    top_k: int = 2
    """Routed experts per token."""
    expert_hidden_dim: int | None = None
    """Each expert's SwiGLU width; None means the dense FFN width / 4 (fine-grained experts)."""
    aux_loss_coef: float = 0.01
    """Weight of the expert-level balance loss added to the training loss (0 turns it off)."""
    scoring: str = "softmax"
    """Router scores: softmax (DeepSeek-V2) or sigmoid (DeepSeek-V3)."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3's aux-loss-free balancing: per-step bias nudge for selection (sigmoid scoring)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1."""
    first_dense_layers: int = 1
    """Leading layers that keep a dense FFN (DeepSeek keeps the first one dense)."""


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    dim: int = 192
    """Width of the residual stream."""
    n_layers: int = 4
    """Decoder blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    hidden_dim: int | None = None
    """SwiGLU hidden width; None means round(8/3·dim) up to a multiple of `multiple_of`."""
    multiple_of: int = 32
    """Rounding for the derived hidden_dim."""
    max_seq_len: int = 128
    """Longest sequence (training window and KV cache length)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    dropout: float = 0.0
    """Dropout during training: on the attention probabilities, and on the attention and MLP outputs."""
    tie_embeddings: bool = True
    """Share embed_tokens and lm_head weights."""
    vocab_size: int = 0
    """Filled from the tokenizer; never set by hand."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts in place of the dense FFN (off by default)."""

    def to_dict(self) -> dict:
        """The fields, plus Hugging Face's name for tie_embeddings, which peft reads to keep a tied
        lm_head tied when it trains embedding rows (Transformer.get_input_embeddings)."""
        return {**dataclasses.asdict(self), "tie_word_embeddings": self.tie_embeddings}

    def __post_init__(self):
        if isinstance(self.moe, dict):  # read back from a checkpoint's config.json
            object.__setattr__(self, "moe", MoEConfig(**self.moe))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        raw = int(8 * self.dim / 3)
        return self.multiple_of * -(-raw // self.multiple_of)


COMPILE_MODES = ("max-autotune-no-cudagraphs",)
"""torch.compile modes `runtime.compile` may name. Not the CUDA-graph ones: `runtime.cuda_graphs`
turns graphs on where a stage's shapes allow them."""


def compile_problem(value: bool | str) -> str | None:
    """What is wrong with a `runtime.compile` value, or None."""
    if isinstance(value, str) and value not in ("auto", *COMPILE_MODES):
        return f"runtime.compile={value!r} must be auto, true, false or {', '.join(COMPILE_MODES)}"
    return None


@dataclass(kw_only=True, frozen=True)
class RuntimeConfig:
    device: str = "auto"
    """`auto` (cuda if present, else cpu), `cpu`, `cuda` or `cuda:N`."""
    dtype: str = "auto"
    """`auto` (bfloat16 on CUDA and on CPUs where bf16 matmuls measure faster, else float32),
    `float32` or `bfloat16` (autocast; weights and optimizer state stay float32)."""
    compile: bool | str = "auto"
    """Wrap the training model in torch.compile: `auto` compiles on a GPU (2-3x there) and not on
    the CPU (no speed-up on 2 cores, and a minute of compiling); true or false force it.
    `max-autotune-no-cudagraphs` compiles with that torch.compile mode: it times several kernels
    for every matmul and fuses elementwise work into them, for minutes of compiling; for long runs."""
    cuda_graphs: bool | str = "auto"
    """Replay each compiled training step's forward and backward as CUDA graphs, one launch each
    instead of one per kernel. `auto`: when compiling on one GPU, for a dense model whose batches
    all have one shape, without gradient accumulation and unless `compile` is
    max-autotune-no-cudagraphs (so pretrain, sft and lora, and dpo and grpo, which pad their batches to
    one shape where this holds; LoRA's step makes 451 matmul launches
    and waited on a slow host: reports/gpu_speed.md); false: never."""
    compile_ahead: bool | str = "auto"
    """`auto`: where the training stages compile and run in one process, the pretrain stage compiles
    lora's, dpo's and grpo's steps and eval's decode step in background processes while it trains,
    so that each of those stages finds its compiled graphs in Inductor's cache instead of spending
    10-40 s of its start-up on them (stages/compile_ahead.py); false: each stage compiles when it
    starts."""
    threads: int | str = "auto"
    """CPU threads for training and eval. `auto`: torch's own count (one per core), fixed for the
    run; `follow`: one per core that other programs leave free, re-checked every 2 s
    (tinyllm/cpu_threads.py: faster beside a busy program, but the weights then depend on the
    machine's load, since the weight gradients sum over the batch in a thread-dependent order);
    N: always N. Ignored on a GPU."""


@dataclass(kw_only=True, frozen=True)
class DistributedConfig:
    nproc: int = 1
    """Processes per training stage, one per GPU. Above 1 (or with deepspeed) a stage relaunches
    itself under `torchrun --standalone --nproc_per_node nproc`; a stage already started by
    torchrun (e.g. multi-node) ignores this."""
    strategy: str = "ddp"
    """`ddp` (PyTorch DistributedDataParallel) or `deepspeed` (ZeRO; see zero_stage)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3: tinyllm/train/zero/zero<stage>.json."""


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    interval: int = 200
    """Optimizer steps between resumable checkpoints in checkpoints/<stage>/ (0: none)."""
    keep: int = 2
    """How many of the newest resumable checkpoints are kept."""
    resume: str = "auto"
    """`auto`: continue from the newest valid checkpoint of the same run; `never`: start over."""


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 0
    """Training window; 0 means model.max_seq_len."""
    lr: float = 2e-3
    """Peak learning rate after warmup."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    eval_interval: int = 200
    """Steps between validation-loss measurements (and at the last step)."""
    eval_batches: int = 10
    """Validation micro-batches per measurement."""
    log_interval: int = 20
    """Steps between log lines and dvclive points."""
    keep: str = "best"
    """Which weights the stage saves when it has validation data: `best` (the lowest validation
    loss seen at an eval point) or `last`. Without validation data: the last."""
    patience: int = 0
    """With keep: best, stop once this many evaluations in a row have not beaten the best one
    (0: run every step). The learning-rate schedule still spans max_steps, so the weights kept
    are the ones the full run would keep; only the discarded tail is skipped."""

    unused: typing.ClassVar[dict[str, str]] = {}
    """Inherited params this section never reads, each with why: naming one in params is an error
    even at its default value, so a user does not tune a knob that does nothing."""


VALIDATION_FIELDS = ("eval_interval", "eval_batches", "keep", "patience")
"""The params of measuring a validation loss, which only pretrain and sft do."""
NO_VALIDATION = {name: "measures no validation loss (only pretrain and sft do); remove it"
                 for name in VALIDATION_FIELDS}


@dataclass(kw_only=True, frozen=True)
class SFTConfig(TrainConfig):
    """Fine-tuning defaults: fewer steps and a shorter warmup than pretraining, at its learning rate."""

    max_steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    pretrain_mix: float = 0.25
    """Share of each batch's rows taken from pretraining text, so SFT does not wash out facts
    the model only read (in a probe of the embedded world, 25% lifted held-out QA from 89% to 97%)."""
    system_prompt: str | None = None
    """Prepended as a system message to every training conversation when set."""


@dataclass(kw_only=True, frozen=True)
class LoRAConfig(TrainConfig):
    """LoRA (peft) on the SFT model, teaching the identity set; the base weights stay frozen."""

    unused: typing.ClassVar[dict[str, str]] = NO_VALIDATION

    enabled: bool = True
    """False makes the lora stage write only a note, and eval and chat skip it."""
    max_steps: int = 200
    lr: float = 5e-3
    min_lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    rank: int = 8
    """Rank r of each low-rank update B·A."""
    alpha: float = 16.0
    """Scale: the update is (alpha / rank)·B·A."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear": every Linear but lm_head."""
    replay_fraction: float = 0.625
    """Share of each batch's rows taken from the SFT chats, so learning who it is does not make
    the model answer every question with its name."""
    train_new_tokens: bool = True
    """Also train the embedding rows of the identity set's tokens that neither pretraining nor SFT
    ever used (tinyllm/train/lora.py says why)."""


@dataclass(kw_only=True, frozen=True)
class DPOConfig(TrainConfig):
    """Direct preference optimisation from the chat model before it (lora merged, else sft) against
    a frozen copy of it."""

    unused: typing.ClassVar[dict[str, str]] = NO_VALIDATION

    max_steps: int = 150
    batch_size: int = 8
    """Preference pairs per micro-batch (2 × batch_size sequences)."""
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta: float = 0.1
    """Strength of the pull towards the reference: loss = -log σ(β·(Δchosen - Δrejected))."""
    nll_coef: float = 0.0
    """Weight of the chosen replies' negative log-likelihood per token, added to the loss (RPO):
    it makes the chosen reply the one the model gives, not only likelier than the rejected one."""


GRPO_LOSS_NORMS = ("token", "sequence", "constant")
"""How the grpo loss averages per-token losses: over every reply token of the batch (DAPO), per
reply then over replies (the original GRPO), or summed over rows × max_new_tokens (Dr. GRPO)."""


@dataclass(kw_only=True, frozen=True)
class GRPOConfig(TrainConfig):
    """Reinforcement learning with verifiable rewards from the DPO model (tinyllm/train/grpo.py)."""

    unused: typing.ClassVar[dict[str, str]] = {
        **NO_VALIDATION, "seq_len": "trains on rows of a prompt and at most grpo.max_new_tokens; remove it"}

    enabled: bool = True
    """False makes the grpo stage write only a note; eval, chat and export then take dpo."""
    max_steps: int = 100
    batch_size: int = 16
    """Prompts per micro-batch (each sampled group_size times)."""
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    log_interval: int = 5
    group_size: int = 8
    """Replies sampled per prompt (G); advantages compare a reply with its own group."""
    max_new_tokens: int = 16
    """Length cap of a sampled reply."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    updates_per_rollout: int = 2
    """Optimizer steps each rollout is used for (GRPO's μ); from the second one on, the policy has
    moved from the one that sampled, and the ratio clip limits how far a step goes."""
    clip_eps: float = 0.2
    """Clip range ε of the ratio π/π_old."""
    kl_coef: float = 0.0
    """Weight of the KL(π‖π_ref) penalty per token (0: none; the KL is logged either way)."""
    loss_norm: str = "token"
    """One of GRPO_LOSS_NORMS."""
    scale_advantages: bool = False
    """Divide advantages by the group's std (the original GRPO); false: only subtract the mean (Dr. GRPO)."""


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    max_new_tokens: int = 24
    """Greedy tokens generated per fact prompt or chat question."""
    max_fact_prompts: int = 600
    """Cap on fact-completion prompts scored (a seeded sample when there are more)."""
    max_chat_prompts: int = 300
    """Cap on questions scored per chat eval set (a seeded sample when there are more)."""
    val_max_tokens: int = 200_000
    """Cap on validation tokens used for perplexity."""
    prompts: str = "data/eval/prompts.jsonl"
    """A JSON Lines file of prompts ({"prompt": ...} or {"messages": [...]}); the report shows every
    chat stage's greedy reply to each, side by side. Empty string: none."""
    benchmarks: list = field(default_factory=lambda: ["data/benchmarks/example"])
    """Multiple-choice benchmarks: files or folders in C-Eval/CMMLU's CSV layout or JSON Lines
    (tinyllm/eval/benchmark.py). The world's own benchmark is added when data.source is world."""
    shots: int = 0
    """Few-shot examples before each benchmark question, from the subject's dev file when it has one."""
    max_bench_items: int = 300
    """Cap on questions scored per benchmark subject (a seeded sample when there are more)."""


@dataclass(kw_only=True, frozen=True)
class Params:
    seed: int = 1337
    """Seeds data generation, initialization and batch order."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list)  # items are checked by the section's own rules
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _float_field(hint) -> bool:
    return hint is float or float in typing.get_args(hint)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _build(cls, raw: dict, prefix: str, errors: list[str]):
    """Build dataclass `cls` from `raw`, appending a message per problem to `errors`."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            errors.append(f"{name}: unknown param (known: {', '.join(sorted(fields))})")
            continue
        if key in getattr(cls, "unused", {}):
            errors.append(f"{name}: {prefix[:-1]} {cls.unused[key]}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.", errors)
        elif _float_field(hint) and isinstance(value, str) and _parses_as_float(value):
            kwargs[key] = float(value)  # PyYAML (YAML 1.1) reads 1e-05 as a string; DVC's -S writes that form
        elif not _type_ok(value, hint):
            errors.append(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
        else:
            kwargs[key] = float(value) if hint is float else value
    return cls(**kwargs)


def _check_train(section: str, t: TrainConfig, max_seq_len: int) -> list[str]:
    """Rules every training section (pretrain, sft, ...) obeys."""
    if "eval_interval" in type(t).unused:  # lora, dpo, grpo: no validation, so none of its rules
        return _check_train_steps(section, t, max_seq_len)
    e = [f"{section}.{name}={getattr(t, name)} must be > 0"
         for name in ("eval_interval", "eval_batches") if getattr(t, name) <= 0]
    if t.log_interval > 0 and t.eval_interval % t.log_interval:
        e.append(f"{section}.eval_interval={t.eval_interval} must be a multiple of {section}.log_interval="
                 f"{t.log_interval} (validation runs at log points)")
    if t.keep not in ("best", "last"):
        e.append(f"{section}.keep={t.keep!r} must be 'best' or 'last'")
    if t.patience < 0:
        e.append(f"{section}.patience={t.patience} must be >= 0 (0: run every step)")
    return e + _check_train_steps(section, t, max_seq_len)


def _check_train_steps(section: str, t: TrainConfig, max_seq_len: int) -> list[str]:
    """The optimizer, schedule and batch rules of every training section."""
    e = [f"{section}.{name}={getattr(t, name)} must be > 0"
         for name in ("max_steps", "batch_size", "grad_accum", "log_interval") if getattr(t, name) <= 0]
    if t.seq_len < 0 or t.seq_len > max_seq_len:
        e.append(f"{section}.seq_len={t.seq_len} must be in [0, model.max_seq_len={max_seq_len}]")
    if t.warmup_steps >= t.max_steps:
        e.append(f"{section}.warmup_steps={t.warmup_steps} must be < {section}.max_steps={t.max_steps}")
    e += [f"{section}.{name}={getattr(t, name)} must be >= 0"
          for name in ("warmup_steps", "grad_clip", "weight_decay") if getattr(t, name) < 0]
    e += [f"{section}.{name}={getattr(t, name)} must be in [0, 1)"
          for name in ("beta1", "beta2") if not 0 <= getattr(t, name) < 1]
    if not 0 <= t.min_lr <= t.lr:
        e.append(f"{section}.min_lr={t.min_lr} must be in [0, {section}.lr={t.lr}]")
    return e


TRAIN_SECTIONS = ("pretrain", "sft", "lora", "dpo", "grpo")
"""The params sections that configure a training stage (each a TrainConfig)."""


def _positive(values: dict[str, float]) -> list[str]:
    """`name=value must be > 0` for each dotted param name whose value is not."""
    return [f"{name}={value} must be > 0" for name, value in values.items() if value <= 0]


def _in_unit_interval(values: dict[str, float]) -> list[str]:
    """`name=value must be in [0, 1)` for each dotted param name whose value is not."""
    return [f"{name}={value} must be in [0, 1)" for name, value in values.items() if not 0 <= value < 1]


def _check_model(m: ModelConfig) -> list[str]:
    """Shapes that cannot be built: head split, grouped-query heads, RoPE's even head dim."""
    sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "multiple_of", "rope_theta")
    e = _positive({f"model.{name}": getattr(m, name) for name in sizes})
    if m.hidden_dim is not None:
        e += _positive({"model.hidden_dim": m.hidden_dim})
    if m.n_heads > 0 and m.dim % m.n_heads:
        e.append(f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}")
    elif m.n_heads > 0 and (m.dim // m.n_heads) % 2:
        e.append(f"model.dim/model.n_heads={m.dim // m.n_heads} (head dim) must be even for RoPE")
    if m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads:
        e.append(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    e += _in_unit_interval({"model.dropout": m.dropout})
    if m.vocab_size:
        e.append("model.vocab_size is taken from the tokenizer; remove it from params")
    return e + (_check_moe(m.moe, m.n_layers) if m.moe.enabled else [])


def _check_moe(moe: MoEConfig, n_layers: int) -> list[str]:
    e = _positive({"model.moe.n_routed_experts": moe.n_routed_experts})
    if moe.expert_hidden_dim is not None:
        e += _positive({"model.moe.expert_hidden_dim": moe.expert_hidden_dim})
    if not 0 < moe.top_k <= moe.n_routed_experts:
        e.append(f"model.moe.top_k={moe.top_k} must be in [1, model.moe.n_routed_experts={moe.n_routed_experts}]")
    if moe.n_shared_experts < 0:
        e.append(f"model.moe.n_shared_experts={moe.n_shared_experts} must be >= 0")
    if moe.scoring not in ("softmax", "sigmoid"):
        e.append(f"model.moe.scoring={moe.scoring!r} must be 'softmax' or 'sigmoid'")
    if moe.aux_loss_coef < 0 or moe.bias_update_rate < 0:
        e.append("model.moe.aux_loss_coef and model.moe.bias_update_rate must be >= 0")
    if not 0 <= moe.first_dense_layers < n_layers:
        e.append(f"model.moe.first_dense_layers={moe.first_dense_layers} must be in [0, model.n_layers={n_layers}) "
                 "so at least one layer has experts")
    return e


def _check_post_training(p: Params) -> list[str]:
    """The knobs only SFT, LoRA, DPO and GRPO have (their shared training rules are `_check_train`)."""
    lora = p.lora
    e = _in_unit_interval({"sft.pretrain_mix": p.sft.pretrain_mix, "lora.dropout": lora.dropout,
                           "lora.replay_fraction": lora.replay_fraction})
    e += _positive({"lora.rank": lora.rank, "lora.alpha": lora.alpha, "dpo.beta": p.dpo.beta})
    if p.dpo.nll_coef < 0:
        e.append(f"dpo.nll_coef={p.dpo.nll_coef} must be >= 0 (0: plain DPO)")
    e += _check_grpo(p)
    e += _rows_left("sft", p.sft.batch_size, "sft.pretrain_mix", p.sft.pretrain_mix, "the chats", "mix")
    e += _rows_left("lora", lora.batch_size, "lora.replay_fraction", lora.replay_fraction, "the identity chats",
                    "fraction")
    targets = lora.target_modules
    names_ok = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if targets != "all-linear" and not names_ok:
        e.append(f"lora.target_modules={targets!r} must be 'all-linear' or a non-empty list of module names")
    return e


def _rows_left(section: str, batch_size: int, share_name: str, share: float, what: str, noun: str) -> list[str]:
    """The error when the rows a batch gives to mixed-in data (`share` of `batch_size`) leave none for `what`."""
    if 0 <= share < 1 and batch_size - round(batch_size * share) < 1:
        return [(f"{section}.batch_size={batch_size} with {share_name}={share} leaves no row for {what}; "
                 f"raise the batch size or lower the {noun}")]
    return []


def _check_grpo(p: Params) -> list[str]:
    g = p.grpo
    e = _positive({"grpo.temperature": g.temperature, "grpo.max_new_tokens": g.max_new_tokens,
                   "grpo.updates_per_rollout": g.updates_per_rollout})
    if g.group_size < 2:
        e.append(f"grpo.group_size={g.group_size} must be >= 2 (advantages compare replies within a group)")
    if not 0 < g.clip_eps < 1:
        e.append(f"grpo.clip_eps={g.clip_eps} must be in (0, 1)")
    if g.kl_coef < 0:
        e.append(f"grpo.kl_coef={g.kl_coef} must be >= 0 (0: no KL penalty)")
    if g.loss_norm not in GRPO_LOSS_NORMS:
        e.append(f"grpo.loss_norm={g.loss_norm!r} must be one of {', '.join(GRPO_LOSS_NORMS)}")
    if g.max_new_tokens >= p.model.max_seq_len:
        e.append(f"grpo.max_new_tokens={g.max_new_tokens} must be below model.max_seq_len={p.model.max_seq_len} "
                 "(the prompt needs room)")
    return e


def _check_data(d: DataConfig) -> list[str]:
    """Where the data comes from (the world or the user's files) and how it is filtered."""
    e = []
    if d.source not in ("world", "files"):
        e.append(f"data.source={d.source!r} must be 'world' or 'files'")
    if d.source == "files" and not d.pretrain:
        e.append("data.pretrain must list at least one file or glob when data.source is 'files'")
    for kind in ("pretrain", "sft", "identity", "dpo", "grpo"):
        if not all(isinstance(x, str) and x for x in getattr(d, kind)):
            e.append(f"data.{kind}={getattr(d, kind)!r} must be a list of paths or globs")
        elif d.source == "world" and getattr(d, kind):
            e.append(f"data.{kind} is read only when data.source is 'files' (it is 'world')")
    if d.format != "auto" and d.format not in KIND_FORMATS["sft"]:
        e.append(f"data.format={d.format!r} must be auto or one of {', '.join(KIND_FORMATS['sft'])}")
    if d.min_chars < 0 or d.max_chars < 0 or 0 < d.max_chars < d.min_chars:
        e.append(f"data.min_chars={d.min_chars}, data.max_chars={d.max_chars}: need 0 <= min_chars <= max_chars "
                 "(max_chars 0: no limit)")
    if not 0 <= d.heldout_share < 1 or d.heldout_min < 0:
        e.append(f"data.heldout_share={d.heldout_share} must be in [0, 1) and data.heldout_min={d.heldout_min} >= 0")
    w = d.world
    if w.n_people < 2:
        e.append(f"data.world.n_people={w.n_people} must be >= 2")
    e += _positive({"data.world.bios_per_person": w.bios_per_person})
    e += [f"data.world.{name}={getattr(w, name)} must be in [0, 1]"
          for name in ("english_fraction", "heldout_fraction") if not 0 <= getattr(w, name) <= 1]
    if w.arithmetic_answer not in ARITHMETIC_ANSWERS:
        e.append(f"data.world.arithmetic_answer={w.arithmetic_answer!r} must be "
                 + " or ".join(map(repr, ARITHMETIC_ANSWERS)))
    return e


def _check_tokens_and_eval(p: Params) -> list[str]:
    e = _positive({"tokenize.batch_docs": p.tokenize.batch_docs, "tokenize.shard_tokens": p.tokenize.shard_tokens,
                   **{f"eval.{name}": getattr(p.eval, name) for name in
                      ("max_new_tokens", "max_fact_prompts", "max_chat_prompts", "val_max_tokens", "max_bench_items")}})
    if p.eval.max_new_tokens >= p.model.max_seq_len:
        e.append(f"eval.max_new_tokens={p.eval.max_new_tokens} must be below model.max_seq_len={p.model.max_seq_len} "
                 "(the prompt needs room)")
    if p.eval.shots < 0:
        e.append(f"eval.shots={p.eval.shots} must be >= 0")
    if not all(isinstance(x, str) and x for x in p.eval.benchmarks):
        e.append(f"eval.benchmarks={p.eval.benchmarks!r} must be a list of paths")
    if p.tokenizer.vocab_size < 260:
        e.append(f"tokenizer.vocab_size={p.tokenizer.vocab_size} must be >= 260 (256 bytes + specials)")
    if p.tokenizer.split_digits < 0:
        e.append(f"tokenizer.split_digits={p.tokenizer.split_digits} must be >= 0 (0: numbers stay whole)")
    if p.tokenizer.max_corpus_bytes < 0:
        e.append(f"tokenizer.max_corpus_bytes={p.tokenizer.max_corpus_bytes} must be >= 0 (0: the whole corpus)")
    if not 0 < p.tokenize.val_fraction < 1:
        e.append(f"tokenize.val_fraction={p.tokenize.val_fraction} must be in (0, 1)")
    return e


def _check_machine(p: Params) -> list[str]:
    """Device, precision, processes and resumable checkpoints: how the training stages run."""
    e = _positive({"distributed.nproc": p.distributed.nproc, "checkpoint.keep": p.checkpoint.keep})
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", p.runtime.device):
        e.append(f"runtime.device={p.runtime.device!r} must be auto, cpu, cuda or cuda:N")
    threads = p.runtime.threads
    if threads not in ("auto", "follow") and not (isinstance(threads, int) and threads >= 1):
        e.append(f"runtime.threads={threads!r} must be auto, follow or a number of threads >= 1")
    if problem := compile_problem(p.runtime.compile):
        e.append(problem)
    if p.runtime.cuda_graphs not in ("auto", False):
        e.append(f"runtime.cuda_graphs={p.runtime.cuda_graphs!r} must be auto or false")
    if p.runtime.compile_ahead not in ("auto", False):
        e.append(f"runtime.compile_ahead={p.runtime.compile_ahead!r} must be auto or false")
    if p.runtime.dtype not in ("auto", "float32", "bfloat16"):
        e.append(f"runtime.dtype={p.runtime.dtype!r} must be auto, float32 or bfloat16")
    if p.distributed.strategy not in ("ddp", "deepspeed"):
        e.append(f"distributed.strategy={p.distributed.strategy!r} must be 'ddp' or 'deepspeed'")
    if p.distributed.zero_stage not in (1, 2, 3):
        e.append(f"distributed.zero_stage={p.distributed.zero_stage} must be 1, 2 or 3")
    for section in TRAIN_SECTIONS:
        batch = getattr(p, section).batch_size
        if batch > 0 and batch % p.distributed.nproc:
            e.append(f"{section}.batch_size={batch} must be divisible by distributed.nproc={p.distributed.nproc}")
    if p.checkpoint.interval < 0:
        e.append(f"checkpoint.interval={p.checkpoint.interval} must be >= 0 (0: no resumable checkpoints)")
    if p.checkpoint.resume not in ("auto", "never"):
        e.append(f"checkpoint.resume={p.checkpoint.resume!r} must be 'auto' or 'never'")
    return e


def _check(p: Params) -> list[str]:
    """Cross-field rules, section by section: each message names the param and says what would work."""
    e = _check_model(p.model)
    for section in TRAIN_SECTIONS:
        e += _check_train(section, getattr(p, section), p.model.max_seq_len)
    return e + _check_post_training(p) + _check_data(p.data) + _check_tokens_and_eval(p) + _check_machine(p)


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise one ConfigError listing every problem."""
    errors: list[str] = []
    params = _build(Params, raw or {}, "", errors)
    if not errors:
        errors = _check(params)
    if errors:
        raise ConfigError(f"{source}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))


def to_dict(obj) -> dict:
    """A dataclass config as plain data (for JSON next to checkpoints)."""
    return dataclasses.asdict(obj)
