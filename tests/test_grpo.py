"""GRPO: advantages and the clipped loss on hand-computed examples, the verifier on well-formed and
malformed replies, prompts split over ranks, a tiny policy learning a toy reward, an exact
resume in the middle of a rollout round, and the stage on two CPU processes."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_chat_checkpoint
from safetensors.torch import load_file

from tinyllm.config import CheckpointConfig, DistributedConfig, GRPOConfig, ModelConfig, RuntimeConfig, parse_params
from tinyllm.data.jsonl import read_jsonl
from tinyllm.errors import ConfigError, DataError
from tinyllm.eval.verify import final_number, is_correct, score, validate_prompt
from tinyllm.model.transformer import Transformer
from tinyllm.train.distributed import Dist, TrainingRun
from tinyllm.train.grpo import RolloutBatches, round_prompts, run_grpo
from tinyllm.train.loop import fit
from tinyllm.train.objectives import GRPOLoss, group_advantages, grpo_loss, token_logprobs

CPU = RuntimeConfig(device="cpu")


def test_advantages_are_rewards_against_their_own_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    centered = group_advantages(rewards, scale=False)
    assert torch.allclose(centered, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]))
    scaled = group_advantages(rewards, scale=True)  # population std: 0.5, 0 and √(3)/4
    assert torch.allclose(scaled[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(scaled[1], torch.zeros(4))  # no variance: nothing to learn, and no division by 0
    assert torch.allclose(scaled[2], torch.tensor([-1, -1, -1, 3]) / math.sqrt(3), atol=1e-5)


def test_clipped_loss_on_a_hand_computed_example():
    # row 0: ratio 1.5 on both tokens, advantage +1 → clipped to 1.2: per-token loss −1.2
    # row 1: ratio 0.5 on its one reply token, advantage −1 → min(−0.5, −0.8) = −0.8: loss +0.8
    old = torch.zeros(2, 2)
    logps = torch.tensor([[math.log(1.5)] * 2, [math.log(0.5), 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    args = dict(old_logps=old, ref_logps=logps, advantages=adv, mask=mask, clip_eps=0.2, kl_coef=0.0,
                max_new_tokens=4)
    token, extras = grpo_loss(logps, norm="token", **args)
    assert token.item() == pytest.approx((-1.2 * 2 + 0.8) / 3)  # DAPO: every reply token counts once
    assert grpo_loss(logps, norm="sequence", **args)[0].item() == pytest.approx((-1.2 + 0.8) / 2)  # GRPO
    assert grpo_loss(logps, norm="constant", **args)[0].item() == pytest.approx((-2.4 + 0.8) / (2 * 4))  # Dr. GRPO
    assert extras["clip_fraction"].item() == pytest.approx(1.0) and extras["kl"].item() == pytest.approx(0.0)
    # unclipped when the ratio is inside 1 ± ε: the plain policy gradient, −ratio·A
    inside = torch.tensor([[math.log(1.1)] * 2, [math.log(0.9), 0.0]])
    loss, extras = grpo_loss(inside, norm="token", **{**args, "ref_logps": inside})
    assert loss.item() == pytest.approx((-1.1 * 2 + 0.9) / 3) and extras["clip_fraction"].item() == 0.0
    # the k3 KL estimate against a reference twice as likely per token: e^{log 2} − log 2 − 1
    kl = 1 - math.log(2)
    loss, extras = grpo_loss(logps, norm="token", **{**args, "ref_logps": logps + math.log(2), "kl_coef": 0.5})
    assert extras["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(token.item() + 0.5 * kl, abs=1e-6)


def test_the_gradient_raises_the_replies_that_beat_their_group(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                                    vocab_size=tokenizer.get_vocab_size()))
    ids = torch.randint(0, 300, (2, 9))
    labels = ids[:, 1:].clone()
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids[:, :-1], "labels": labels, "advantages": torch.tensor([1.0, -1.0])}
    with torch.no_grad():
        before, _ = token_logprobs(model, batch["input_ids"], labels)
    batch.update(old_logps=before, ref_logps=before)
    loss, _ = GRPOLoss(0.2, 0.0, "token", 4)(model, batch)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after, _ = token_logprobs(model, batch["input_ids"], labels)
    assert after[0].sum() > before[0].sum() and after[1].sum() < before[1].sum()


@pytest.mark.parametrize("reply, answer, right", [
    ("12加7等于19。", "19", True),
    ("12 plus 7 equals 19.", "19", True),
    ("19", "19", True),
    ("答案：19", "19", True),
    ("12加7等于18。", "19", False),
    ("12加7等于", "19", False),          # cut off before the result: the restated 7 is not an answer
    ("12加7", "7", False),               # restating the problem never counts... unless it ends there
    ("I do not know.", "19", False),
    ("", "19", False),
    ("等于等于。。", "19", False),
    ("😀😀", "3", False),
    ("12加7等于19。13", "19", True),      # the number after the last 等于 wins over a trailing one
    ("1 plus 2 is 3", "3", True),
])
def test_the_verifier_takes_the_number_after_the_last_equals(reply, answer, right):
    item = {"answer": answer, "kind": "arithmetic"}
    if reply == "12加7" and answer == "7":  # no 等于: the last number is the answer given
        assert final_number(reply) == 7
        return
    assert is_correct(reply, item) is right
    assert score(reply, item) == float(right)


def test_the_verifier_scores_facts_by_the_answer_in_the_reply():
    item = {"answer": "杭州", "kind": "city"}
    assert score("李明住在杭州。", item) == 1.0
    assert score("李明住在上海。", item) == 0.0 and score("", item) == 0.0
    assert final_number("no digits here") is None


def test_prompt_lines_are_validated_and_named_by_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "3加5等于几？"}], "answer": "8", "kind": "arithmetic"}
    assert validate_prompt(good) is None
    assert "last message" in validate_prompt({**good, "messages": good["messages"] + [
        {"role": "assistant", "content": "8"}]})
    assert "answer" in validate_prompt({**good, "answer": ""})
    assert "whole-number" in validate_prompt({**good, "answer": "eight"})
    assert "role" in validate_prompt({**good, "messages": [{"content": "ctx"}, *good["messages"]]})
    assert "role" in validate_prompt({**good, "messages": [{"role": "tool", "content": "ctx"}, *good["messages"]]})
    assert "messages" in validate_prompt(["not", "an", "object"])
    path = tmp_path / "grpo.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=r"grpo.jsonl:2"):
        list(read_jsonl(path, validate_prompt))


def test_impossible_grpo_params_are_named():
    with pytest.raises(ConfigError) as err:
        parse_params({"grpo": {"group_size": 1, "clip_eps": 1.5, "loss_norm": "mean", "max_new_tokens": 500}})
    for name in ("grpo.group_size=1", "grpo.clip_eps=1.5", "grpo.loss_norm='mean'", "grpo.max_new_tokens=500"):
        assert name in str(err.value)
    zero3 = TrainingRun(distributed=DistributedConfig(strategy="deepspeed", zero_stage=3))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        run_grpo(parse_params({}), Path("no/checkpoint"), Path("no/prompts.jsonl"), Path("no/out"), zero3)


def test_each_round_splits_its_prompts_over_the_ranks():
    one = Dist()
    for round_index in range(7):  # 7 rounds of 6 over 10 prompts: rounds cross epochs
        whole = round_prompts(round_index, 6, 10, seed=3, dist=one)
        shares = [round_prompts(round_index, 6, 10, seed=3, dist=Dist(rank=r, world_size=2)) for r in range(2)]
        assert sorted(shares[0] + shares[1]) == sorted(whole) and len(shares[0]) == len(shares[1]) == 3
    first_epoch = [i for r in range(5) for i in round_prompts(r, 2, 10, seed=3, dist=one)]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per pass


TARGET = "8"
PROMPTS = [{"messages": [{"role": "user", "content": q}], "answer": TARGET, "kind": "digit"}
           for q in ("3加5等于几？", "李明住在哪里？", "Li Ming lives where?", "王芳是谁？")]


def _policy(tokenizer, seed=0, max_seq_len=32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=max_seq_len,
                                   vocab_size=tokenizer.get_vocab_size()))


def _cfg(**overrides):
    return GRPOConfig(**{"max_steps": 60, "batch_size": 4, "group_size": 8, "max_new_tokens": 6, "lr": 1e-2,
                         "min_lr": 1e-2, "warmup_steps": 1, "log_interval": 5, **overrides})


def _train(tokenizer, cfg, run=None, objective=None):
    model = _policy(tokenizer)
    batches = RolloutBatches(model, tokenizer, PROMPTS, cfg, seed=0, dist=Dist(), dtype=torch.float32)
    objective = objective or GRPOLoss(cfg.clip_eps, cfg.kl_coef, cfg.loss_norm, cfg.max_new_tokens)
    return model, fit(model, objective, batches, cfg, CPU, run=run)


def test_a_tiny_policy_learns_to_say_the_rewarded_digit(tokenizer):
    """Reward 1 for a reply containing "8": from a random 1-layer model (about 1% at first), within
    60 steps (it reaches 96% at step 50 and stays there)."""
    _, result = _train(tokenizer, _cfg())
    rewards = [h["train/reward"] for h in result.history]
    assert rewards[0] < 0.1 and rewards[-1] > 0.9, rewards
    assert all(0 <= h["train/zero_variance"] <= 1 and h["train/reply_length"] <= 6 for h in result.history)
    assert result.history[-1]["train/rollout_tokens_per_sec"] > 0


def test_rollouts_padded_to_one_width_train_as_those_padded_to_their_longest(tokenizer):
    """The fixed width (for CUDA graphs on a GPU) adds right padding only: every micro-batch has
    one shape, and training follows the run without it (the same rollouts, the same losses)."""
    cfg = _cfg(max_steps=6, log_interval=1, batch_size=2, grad_accum=2)  # two prompts a micro-batch: widths differ

    def train(fixed_width):
        model = _policy(tokenizer, max_seq_len=64)  # no prompt cut: they are 26-30 tokens long
        batches = RolloutBatches(model, tokenizer, PROMPTS, cfg, seed=0, dist=Dist(), dtype=torch.float32,
                                 fixed_width=fixed_width)
        objective = GRPOLoss(cfg.clip_eps, cfg.kl_coef, cfg.loss_norm, cfg.max_new_tokens, fixed_width)
        return batches, fit(model, objective, batches, cfg, CPU)

    fixed_batches, fixed = train(True)
    width = max(map(len, fixed_batches.prompt_ids)) + cfg.max_new_tokens
    assert width > min(map(len, fixed_batches.prompt_ids)) + cfg.max_new_tokens
    assert {tuple(batch["input_ids"].shape) for batch, _ in zip(fixed_batches, range(8))} == {(16, width - 1)}
    _, longest = train(False)
    assert [h["train/reward"] for h in fixed.history] == [h["train/reward"] for h in longest.history]
    assert [h["train/loss"] for h in fixed.history] == pytest.approx([h["train/loss"] for h in longest.history],
                                                                     abs=1e-5)
    assert fixed.final["padding_share"] > longest.final["padding_share"]


class CrashAt:
    def __init__(self, objective, n):
        self.objective, self.n, self.calls = objective, n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls >= self.n:
            raise KeyboardInterrupt("killed")
        return self.objective(model, batch)


def test_a_run_killed_mid_round_resumes_exactly(tokenizer, tmp_path):
    cfg = _cfg(max_steps=8, log_interval=1)  # each round trains 2 steps; checkpoints after steps 3, 6
    reference, ref_result = _train(tokenizer, cfg)
    run = TrainingRun(checkpoint=CheckpointConfig(interval=3, keep=2), checkpoint_dir=tmp_path / "ckpt")
    loss = GRPOLoss(cfg.clip_eps, cfg.kl_coef, cfg.loss_norm, cfg.max_new_tokens)
    with pytest.raises(KeyboardInterrupt):
        _train(tokenizer, cfg, run, CrashAt(loss, 6))  # dies in step 6, the second step of the third round
    state = json.loads((tmp_path / "ckpt" / "step-00000003" / "state.json").read_text())
    assert state["data"]["round"] == 2 and len(state["data"]["pending"][0]) == 1  # step 4 reuses round 2
    model, result = _train(tokenizer, cfg, run)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert [h["train/loss"] for h in result.history] == [h["train/loss"] for h in ref_result.history]


def test_the_stage_trains_under_torchrun_on_two_cpu_processes(tokenizer, tmp_path):
    """Each process samples its half of every round's prompts; DDP averages the gradients; the
    resumable state (written every step here) gathers both processes' pending rollouts."""
    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    start = make_chat_checkpoint(tmp_path / "init", tokenizer, max_seq_len=48)
    (work / "artifacts/data").mkdir(parents=True)
    shutil.copytree(start, work / "artifacts/dpo")
    # rewarded: a reply holding an "i", as about half the random model's 16-token replies do (the
    # digit 8: 5%), so that groups differ in reward and every round gives a gradient
    prompts = [{**p, "answer": "i"} for p in PROMPTS]
    (work / "artifacts/data/grpo.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    (work / "params.yaml").write_text(yaml.safe_dump({
        "model": {"max_seq_len": 48},
        "runtime": {"dtype": "float32"},  # as in the tests above, whatever the CPU
        "checkpoint": {"interval": 1},
        "grpo": {"max_steps": 4, "batch_size": 4, "group_size": 4, "max_new_tokens": 16, "lr": 1e-2, "min_lr": 1e-2,
                 "warmup_steps": 1, "log_interval": 1}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "stages.grpo"], cwd=work, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "reports/metrics/grpo.json").read_text())
    assert summary["enabled"] and summary["rollout_rounds"] == 2 and 0 <= summary["train/reward"] <= 1
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(work / "artifacts/grpo/model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)
