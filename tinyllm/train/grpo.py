"""The grpo stage's library entry: reinforcement learning with verifiable rewards, through `fit`.

GRPO (Shao et al., 2024) needs no value model and no reward model: for each prompt the policy
samples G replies, a program scores them (tinyllm/eval/verify.py), and each reply's advantage is
its reward against its own group's. `fit` stays the one training loop: what it iterates over is
`RolloutBatches`, which samples a fresh rollout from the policy being trained whenever the last
one is used up, and the objective is `GRPOLoss` (tinyllm/train/objectives.py).

    run_grpo(params, Path("artifacts/dpo"), Path("artifacts/data/grpo.jsonl"), Path("artifacts/grpo"), run)

What the defaults use, and why (reports/grpo.md measures it):
- advantages not divided by the group's std (Dr. GRPO): with 0/1 rewards, dividing makes a
  question answered right once in 8 weigh as much as one answered right 4 times in 8;
- the loss averaged over every reply token of the batch (DAPO): a long wrong reply is not
  excused per token for being long;
- no KL term (kl_coef 0; the KL to the starting model is still logged): the eval's held-out QA
  is the guard that RL does not cost knowledge, and it is cheaper than a leash;
- each rollout used for 2 optimizer steps (`updates_per_rollout`), so the second step is off
  the sampling policy and the ratio clip does its job.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tinyllm.config import GRPOConfig, Params, to_dict
from tinyllm.data.chat import collate
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END, render_chat, reply_stop_ids, special_id
from tinyllm.errors import ConfigError, DataError
from tinyllm.eval.verify import score, validate_prompt
from tinyllm.infer.generate import generate_batch
from tinyllm.train.checkpoint import load_for_finetuning, save_checkpoint
from tinyllm.train.distributed import Dist, TrainingRun, check_divisible
from tinyllm.train.engine import step_replays
from tinyllm.train.loop import fit
from tinyllm.train.objectives import GRPOLoss, group_advantages, token_logprobs
from tinyllm.train.runtime import autocast, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def round_prompts(round_index: int, per_round: int, n_prompts: int, seed: int, dist: Dist) -> list[int]:
    """This process's prompt indices in rollout round `round_index`: the round takes the next
    `per_round` prompts of an endless stream (each pass over the prompts in a fresh seeded order),
    and process r of N keeps positions r, r + N, ... of them."""
    start = round_index * per_round
    indices = []
    for position in range(start + dist.rank, start + per_round, dist.world_size):
        epoch, offset = divmod(position, n_prompts)
        order = list(range(n_prompts))
        random.Random(f"{seed}/grpo/{epoch}").shuffle(order)
        indices.append(order[offset])
    return indices


class RolloutBatches:
    """Endless micro-batches of replies sampled by the policy as it trains.

    A round samples `group_size` replies to each of this process's prompts (one batched,
    KV-cached `generate_batch` call, seeded by the round and rank), scores them, and turns them
    into `grad_accum` micro-batches with advantages and the per-token log-probs of the sampling
    policy ("old_logps") and of the starting model ("ref_logps"). The round is yielded
    `updates_per_rollout` times in a row, then the next round is sampled from the updated policy.

    `fixed_width`: every micro-batch right-padded to the longest prompt plus `max_new_tokens`, so
    all have one shape and the compiled step may replay as CUDA graphs (`run_grpo` asks for it
    where they would); otherwise each is padded to its own longest row.

    `state()` / `load_state()` carry the round number and whatever of the round is still to be
    trained on, so a resumed run trains on exactly what the interrupted one would have.
    """

    def __init__(self, policy: torch.nn.Module, tok: Tokenizer, prompts: list[dict], cfg: GRPOConfig,
                 seed: int, dist: Dist, dtype: torch.dtype, fixed_width: bool = False):
        self.policy, self.tok, self.prompts, self.cfg, self.seed, self.dist, self.dtype = (
            policy, tok, prompts, cfg, seed, dist, dtype)
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        keep = policy.config.max_seq_len - cfg.max_new_tokens
        self.prompt_ids = [tok.encode(render_chat(p["messages"], add_generation_prompt=True),
                                      add_special_tokens=False).ids[-keep:] for p in prompts]
        self.width = max(map(len, self.prompt_ids)) + cfg.max_new_tokens if fixed_width else None
        self.stop_ids, self.im_end = reply_stop_ids(tok), special_id(tok, IM_END)
        self.pad_id = special_id(tok, ENDOFTEXT)
        self.round = 0
        self.pending: deque[dict] = deque()
        self._low_precision_copy: torch.nn.Module | None = None

    def __iter__(self):
        while True:
            if not self.pending:
                round_batches = self._rollout(self.round)
                self.round += 1
                self.pending.extend(round_batches * self.cfg.updates_per_rollout)
            yield self.pending.popleft()

    @torch.no_grad()
    def _rollout(self, round_index: int) -> list[dict]:
        cfg, device = self.cfg, next(self.policy.parameters()).device
        per_round = cfg.batch_size * cfg.grad_accum
        mine = round_prompts(round_index, per_round, len(self.prompts), self.seed, self.dist)
        owners = [i for i in mine for _ in range(cfg.group_size)]  # the prompt each sample answers
        prompts = [self.prompt_ids[i] for i in owners]
        sample_seed = random.Random(f"{self.seed}/rollout/{round_index}/{self.dist.rank}").getrandbits(62)
        self.reference.to(device)
        start = time.perf_counter()
        replies = generate_batch(self._sampler(device), prompts, cfg.max_new_tokens, stop_ids=self.stop_ids,
                                 pad_id=self.pad_id, temperature=cfg.temperature, seed=sample_seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rewards = torch.tensor([score(self.tok.decode(reply), self.prompts[i]) for i, reply in zip(owners, replies)])
        grouped = rewards.view(len(mine), cfg.group_size)
        advantages = group_advantages(grouped, cfg.scale_advantages).flatten()
        generated = sum(len(r) for r in replies)
        stats = {"stat/reward": rewards.mean(), "stat/zero_variance": (grouped.std(1) == 0).float().mean(),
                 "stat/reply_length": torch.tensor(generated / len(replies)),
                 "stat/rollout_tokens_per_sec": torch.tensor(generated * self.dist.world_size / seconds)}
        rows = []
        for prompt, reply in zip(prompts, replies):
            ended = len(reply) < cfg.max_new_tokens  # stopped by <|im_end|>: learn to stop, too
            answer = list(reply) + ([self.im_end] if ended else [])
            ids = np.asarray(prompt + answer, dtype=np.int64)
            rows.append((ids, np.asarray([False] * len(prompt) + [True] * len(answer))))
        per_micro = len(rows) // cfg.grad_accum
        batches = []
        for k in range(cfg.grad_accum):
            part = slice(k * per_micro, (k + 1) * per_micro)
            batch = collate(rows[part], self.pad_id, self.width)
            batch["old_logps"] = self._logprobs(self.policy, batch, device)
            batch["ref_logps"] = self._logprobs(self.reference, batch, device)
            batch["advantages"] = advantages[part].float()
            batches.append({**batch, **{name: value.float() for name, value in stats.items()}})
        return batches

    def _sampler(self, device: torch.device) -> torch.nn.Module:
        """The model that samples: the policy itself in fp32; in bf16, a bf16 copy of it refreshed in
        place every round (in place, so the decoder's CUDA graphs, which hold its tensors, stay valid)."""
        if self.dtype == torch.float32:
            return self.policy
        if self._low_precision_copy is None:
            self._low_precision_copy = copy.deepcopy(self.policy).to(device=device, dtype=self.dtype).eval()
        else:
            with torch.no_grad():
                for copied, trained in zip(self._low_precision_copy.parameters(), self.policy.parameters()):
                    copied.copy_(trained)
        return self._low_precision_copy

    def _logprobs(self, model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        """Per-token log-probs of the batch's replies, at the precision the training forward uses."""
        was_training = model.training
        model.eval()
        with autocast(device, self.dtype):
            logps, _ = token_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device))
        model.train(was_training)
        return logps.float().cpu()

    def state(self) -> dict:
        """Round number and every process's untrained micro-batches (a collective call under torchrun)."""
        mine = [{name: [str(t.dtype), t.tolist()] for name, t in batch.items()} for batch in self.pending]
        pending = [mine]
        if self.dist.enabled:
            pending = [None] * self.dist.world_size
            torch.distributed.all_gather_object(pending, mine)
        return {"round": self.round, "pending": pending}

    def load_state(self, state: dict) -> None:
        self.round = state["round"]
        if len(state["pending"]) != self.dist.world_size:
            log.warning("the checkpoint was written by %d process(es), not %d: the rest of the interrupted "
                        "rollout round is skipped", len(state["pending"]), self.dist.world_size)
            return
        self.pending = deque(
            {name: torch.tensor(values, dtype=getattr(torch, dtype.removeprefix("torch."))) for name, (dtype, values)
             in batch.items()} for batch in state["pending"][self.dist.rank])


def run_grpo(params: Params, init_dir: Path, prompts_file: Path, out_dir: Path,
             run: TrainingRun | None = None) -> dict:
    """Train the checkpoint in `init_dir` with GRPO on the prompts; save to `out_dir`.

    Raises:
        ConfigError: DeepSpeed ZeRO-3, which leaves no process the whole model to sample from.
        DataError: fewer prompts than one step uses, or a malformed line (names the file and line).
    """
    cfg = params.grpo
    run = run or TrainingRun()
    if run.distributed.strategy == "deepspeed" and run.distributed.zero_stage == 3:
        raise ConfigError("grpo samples replies from the whole model, which ZeRO-3 shards across processes: "
                          "run it with distributed.zero_stage 1 or 2, or strategy ddp")
    check_divisible("grpo", cfg.batch_size, run.dist)
    model, tok, _, _ = load_for_finetuning(init_dir, params.seed)
    prompts = list(read_jsonl(prompts_file, validate_prompt))
    if len(prompts) < cfg.batch_size:
        raise DataError(f"{prompts_file}: {len(prompts)} prompts, fewer than grpo.batch_size={cfg.batch_size}")
    device = resolve_device(params.runtime, run.dist)
    # Where the step could replay as CUDA graphs, every micro-batch gets one width: one compile for
    # that shape and one graph to replay, where rollouts of changing lengths need a compile for any
    # shape and run without graphs (reports/gpu_speed.md).
    graphs = step_replays(model, cfg, params.runtime, run.dist, device, fixed_shapes=True,
                          strategy=run.distributed.strategy)
    batches = RolloutBatches(model, tok, prompts, cfg, params.seed, run.dist, resolve_dtype(params.runtime, device),
                             fixed_width=graphs)
    start = time.perf_counter()
    result = fit(model, GRPOLoss(cfg.clip_eps, cfg.kl_coef, cfg.loss_norm, cfg.max_new_tokens, graphs), batches, cfg,
                 params.runtime, run=run, inputs=[prompts_file], fixed_shapes=graphs)
    first = result.history[0]
    summary = {**result.final, "first/reward": first["train/reward"], "prompts": len(prompts),
               "rollout_rounds": batches.round, "train_seconds": round(time.perf_counter() - start, 1)}
    if run.dist.is_main:
        save_checkpoint(model.cpu(), out_dir, meta={"stage": "grpo", "steps": result.steps, "train": to_dict(cfg),
                                                    "summary": summary}, tokenizer_dir=init_dir)
    return summary
