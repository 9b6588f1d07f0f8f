"""How a training step runs: plain PyTorch (one process, or DDP under torchrun) or DeepSpeed ZeRO.

Both engines offer the same calls, so `fit` has a single loop whatever the strategy:

    engine = make_engine(model, cfg, runtime, dist, distributed_cfg)
    engine.set_lr(lr)
    loss, extras = engine.forward_backward(objective, batch, last_micro)   # per micro-batch
    grad_norm = engine.complete_step()    # per optimizer step: clip and step, or (ZeRO) read the norm
    weights, optim = engine.full_state()   # copies of the full fp32 tensors, by parameter name (collective)
    engine.finish()                        # leaves the trained fp32 weights in `model`

`full_state` is the same for both engines and any number of processes, so a resumable checkpoint
written by one (say DDP on 2 GPUs) can be continued by another (ZeRO-3 on 4), and every stage's
final checkpoint is an ordinary safetensors file.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from tinyllm.config import DistributedConfig, TrainConfig
from tinyllm.train.distributed import Dist
from tinyllm.train.runtime import autocast, compile_options, compiles, cuda_graph_skips, replays_cuda_graphs

ADAM_STATES = ("exp_avg", "exp_avg_sq")
ZERO_CONFIGS = Path(__file__).with_name("zero")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def persistent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's saved tensors on the CPU (copies on a CPU too: best weights and resume
    points keep them while training goes on), without the tied lm_head (it is the embedding)."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def step_replays(model, cfg: TrainConfig, runtime, dist: Dist, device: torch.device, *, fixed_shapes: bool,
                 strategy: str = "ddp") -> bool:
    """Whether `fit`'s compiled step replays as CUDA graphs (`runtime.replays_cuda_graphs`), for a
    model that may be peft-wrapped; never under DeepSpeed, whose hooks were not tried in a graph."""
    moe = getattr(getattr(model, "config", None), "moe", None)
    return strategy != "deepspeed" and replays_cuda_graphs(
        runtime, device, processes=dist.world_size, grad_accum=cfg.grad_accum, fixed_shapes=fixed_shapes,
        moe=bool(moe and moe.enabled))


class TorchEngine:
    """One process, or DDP: gradients all-reduced once per optimizer step (no_sync while accumulating).
    `fixed_shapes`: every batch has one shape, so the compiled step may replay as CUDA graphs
    (`runtime.replays_cuda_graphs`; `cuda_graphs`: asked for, `replays_graphs`: done)."""

    def __init__(self, model, cfg: TrainConfig, runtime, dist: Dist, device: torch.device, dtype: torch.dtype,
                 fixed_shapes: bool = False):
        self.model, self.cfg, self.device, self.dtype = model.to(device).train(), cfg, device, dtype
        compile_model = compiles(runtime, device)
        self.cuda_graphs = step_replays(model, cfg, runtime, dist, device, fixed_shapes=fixed_shapes)
        if compile_model and dist.enabled:
            # Dynamo's DDPOptimizer splits the compiled graph at every gradient bucket, so all-reduces
            # can start during the backward. On our models the split graphs cost far more than the
            # overlap saves: 2 H200s gave 1.15M tokens/s with it, 1.46M without (reports/distributed.md).
            # One whole graph; DDP then all-reduces every bucket right after the backward.
            torch._dynamo.config.optimize_ddp = False
        compiled = torch.compile(model, **compile_options(runtime, self.cuda_graphs)) if compile_model else model
        self.ddp = DistributedDataParallel(compiled, device_ids=[device] if device.type == "cuda" else None,
                                           gradient_as_bucket_view=True) if dist.enabled else None
        self.step_model = self.ddp or compiled
        self.optimizer = build_optimizer(model, cfg, device)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def replays_graphs(self) -> bool:
        """Whether the steps replay as CUDA graphs: asked for, and not declined by Inductor for any
        graph it compiled (it logs why). Meaningful once a step has run."""
        return self.cuda_graphs and cuda_graph_skips() == 0

    def forward_backward(self, objective, batch: dict, last_micro: bool):
        sync = self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()
        if self.cuda_graphs:  # a new step: the last replay's outputs (the loop kept copies) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with sync, autocast(self.device, self.dtype):
            loss, extras = objective(self.step_model, batch)
            (loss / self.cfg.grad_accum).backward()
        return loss, extras

    def complete_step(self) -> torch.Tensor:
        """Clip, step the optimizer and clear the gradients; returns the gradient norm before clipping."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _indexed_names(self) -> list[str]:
        """Parameter names in the optimizer's own numbering (its state_dict keys 0, 1, ...)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def full_weights(self) -> dict[str, torch.Tensor]:
        return persistent_state(self.model)

    def full_state(self) -> tuple[dict, dict]:
        optim: dict[str, torch.Tensor] = {}
        state = self.optimizer.state_dict()["state"]
        for index, name in enumerate(self._indexed_names()):
            for key in ADAM_STATES if index in state else ():
                optim[f"{key}.{name}"] = state[index][key].detach().to("cpu", copy=True)
            if index in state:
                optim["step"] = torch.tensor(float(state[index]["step"]))
        return self.full_weights(), optim

    def load_optimizer_state(self, optim: dict) -> None:
        if "step" not in optim:
            return
        state = {index: {"step": optim["step"].clone(), **{key: optim[f"{key}.{name}"] for key in ADAM_STATES}}
                 for index, name in enumerate(self._indexed_names())}
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    @property
    def eval_model(self):
        return self.model

    def finish(self) -> None:
        pass


def join_single_process_group(device: torch.device) -> None:
    """A process group of one, on a free local port, so DeepSpeed runs without torchrun."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; torchrun would have set it
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def deepspeed_config(cfg: TrainConfig, dist: Dist, dtype: torch.dtype, zero_stage: int) -> dict:
    """The repo's ZeRO file for this stage, with batch, accumulation, clipping and bf16 from params."""
    config = json.loads((ZERO_CONFIGS / f"zero{zero_stage}.json").read_text())
    config.update({
        "train_micro_batch_size_per_gpu": cfg.batch_size // dist.world_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # our own torch AdamW (no fused-op build on CPU)
        "steps_per_print": 2**31 - 1,
    })
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 around the same model and the same AdamW.

    With bf16, DeepSpeed keeps bf16 weights in the module and fp32 master weights (and Adam
    moments) partitioned over the processes. `full_state` gathers them back into full tensors with
    DeepSpeed's public `safe_get_full_*` calls.
    """

    replays_graphs = False
    """Its hooks were not tried inside a CUDA graph (`runtime.replays_cuda_graphs`)."""

    def __init__(self, model, cfg: TrainConfig, runtime, dist: Dist, device: torch.device, dtype: torch.dtype,
                 zero_stage: int):
        import deepspeed

        if not dist.enabled and not torch.distributed.is_initialized():
            join_single_process_group(device)  # no launcher (a benchmark, a notebook): DeepSpeed still wants one
        if device.type == "cpu":
            # On the CPU DeepSpeed would compile its shared-memory all-reduce (about 45 s, once per
            # machine, and a C++ compiler needed) before the first step; gloo does the job as it
            # does for plain DDP, and ZeRO on a CPU is for checking the GPU path, not for speed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.model = model.to(device).train()
        self._own_param_attrs = {id(p): set(vars(p)) for p in model.parameters()}  # DeepSpeed adds its own
        fp32_start = persistent_state(model)
        optimizer = build_optimizer(model, cfg, device)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, dist, dtype, zero_stage))
        if compiles(runtime, device):
            self.engine.compile(compile_kwargs=compile_options(runtime))
        self._set_fp32_weights(fp32_start)  # masters start exact, not rounded through bf16

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, objective, batch: dict, last_micro: bool):
        loss, extras = objective(self.engine, batch)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self.engine.step()  # the optimizer steps (and clips) only at the accumulation boundary
        return loss, extras

    def complete_step(self) -> torch.Tensor:
        """The gradient norm: DeepSpeed already clipped and stepped inside `forward_backward`, at
        the accumulation boundary, so there is nothing left to do."""
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def _trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def full_state(self) -> tuple[dict, dict]:
        return self.full_weights(), self.full_optimizer_state()

    def full_weights(self) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                weights[name] = safe_get_full_fp32_param(param).to("cpu", copy=True)
            else:  # frozen (a LoRA base): not in the optimizer, gathered as is under ZeRO-3
                with deepspeed.zero.GatheredParameters([param]):
                    weights[name] = param.detach().float().cpu().clone()
        buffers = {k: v for k, v in persistent_state(self.model).items() if k not in weights}
        return {**weights, **buffers}

    def full_optimizer_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        steps = [float(s["step"]) for s in self.engine.optimizer.optimizer.state.values() if "step" in s]
        if not steps:
            return {}
        optim = {"step": torch.tensor(steps[0])}
        self._link_adam_state()
        for name, param in self._trainable():
            for key in ADAM_STATES:
                optim[f"{key}.{name}"] = safe_get_full_optimizer_state(param, key).to("cpu", copy=True)
        return optim

    def _set_fp32_weights(self, weights: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self._trainable():
            safe_set_full_fp32_param(param, weights[name].to(self.engine.device))

    def load_optimizer_state(self, optim: dict) -> None:
        """Set the Adam moments of the partitioned optimizer from full per-parameter tensors.

        DeepSpeed creates Adam state lazily at the first step, so it is created here first (private
        names of deepspeed 0.19: the flat fp32 partitions; tests/test_resume.py guards them).
        """
        from deepspeed.utils import safe_set_full_optimizer_state

        if "step" not in optim:
            return
        zero = self.engine.optimizer
        flat = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
        for partition in flat:
            zero.optimizer.state[partition] = {"step": optim["step"].clone(), **{
                key: torch.zeros_like(partition) for key in ADAM_STATES}}
        self._link_adam_state()
        for name, param in self._trainable():
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(param, optim[f"{key}.{name}"].to(self.engine.device), key)

    def _link_adam_state(self) -> None:
        """ZeRO-1/2 reach a parameter's Adam state through views linked after the first optimizer
        step, but deepspeed 0.19 links only the first param group's (our no-decay group would be
        missed); link every group. ZeRO-3 reads the state directly."""
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    @property
    def eval_model(self):
        return self.engine

    def finish(self) -> None:
        """Put the full fp32 weights back into the plain module (ZeRO-3 left it empty), so the stage
        saves an ordinary checkpoint. They are gathered to the CPU and the engine is freed first
        (DeepSpeed's `destroy` leaves hooks and per-parameter attributes that keep it alive; they go
        too), so the GPU never holds the partitioned state and the full weights at once."""
        weights = self.full_weights()
        self.engine.destroy()
        for hook in ("module_forward_pre_hook", "module_forward_post_hook"):  # destroy() leaves them on the model
            handle = getattr(self.engine, hook, None)
            if handle is not None:
                handle.remove()
        if hasattr(self.engine.optimizer, "unregister_grad_acc_post_hooks"):  # ZeRO-3's hook holds the engine
            self.engine.optimizer.unregister_grad_acc_post_hooks()
        for param in self.model.parameters():  # ZeRO-3's per-parameter state (its shard, its gather methods)
            for attr in set(vars(param)) - self._own_param_attrs.get(id(param), set()):
                delattr(param, attr)
        self.engine = None
        gc.collect()  # the engine's reference cycles hold the bf16 copies, fp32 masters and Adam moments
        for name, param in self.model.named_parameters():  # a tied lm_head is the embedding's Parameter
            param.data = weights[name].to(param.device)
        for name, buffer in self.model.named_buffers():
            if name in weights:
                buffer.data = weights[name].to(buffer.device)


def make_engine(model, cfg: TrainConfig, runtime, dist: Dist, device: torch.device, dtype: torch.dtype,
                distributed: DistributedConfig, start: tuple[dict, dict] | None = None, fixed_shapes: bool = False):
    """The engine `distributed.strategy` names; `start` = (weights, optimizer state) to resume from;
    `fixed_shapes`: the batches all have one shape (`TorchEngine`; DeepSpeed never replays graphs).

    Weights go into the module before the engine is built (DeepSpeed partitions what it finds).
    """
    if start is not None:
        missing, unexpected = model.load_state_dict(start[0], strict=False)
        if set(missing) - {"lm_head.weight"} or unexpected:
            raise ValueError(f"resumable checkpoint does not match the model (missing {missing}, "
                             f"unexpected {unexpected})")
    if distributed.strategy == "deepspeed":
        engine = DeepSpeedEngine(model, cfg, runtime, dist, device, dtype, distributed.zero_stage)
    else:
        engine = TorchEngine(model, cfg, runtime, dist, device, dtype, fixed_shapes)
    if start is not None:
        engine.load_optimizer_state(start[1])
    return engine
