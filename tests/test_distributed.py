"""The pretrain stage on several CPU processes (gloo): DDP and DeepSpeed ZeRO train exactly what 1 process
does, and a killed run resumes, on any number of processes, to what an uninterrupted run gives."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tinyllm.config import TokenizeConfig
from tinyllm.data.tokenizer import save_tokenizer
from tinyllm.data.tokens import tokenize_corpus

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "runtime": {"dtype": "float32"},  # the comparisons below hold float32's tolerances on any CPU
    "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, "max_seq_len": 32},
    "pretrain": {"max_steps": 20, "batch_size": 4, "grad_accum": 2, "warmup_steps": 2, "log_interval": 5,
                 "eval_interval": 10, "eval_batches": 2},
}


def _workdir(tmp_path: Path, tokenizer, name: str) -> Path:
    work = tmp_path / name
    (work / "artifacts").mkdir(parents=True)
    corpus = tmp_path / "corpus.jsonl"
    texts = ["李明住在杭州。他养了一只猫。", "王芳是一名医生，她最喜欢的颜色是蓝色。",
             "Li Ming lives in Hangzhou."] * 40
    corpus.write_text("".join(json.dumps({"text": f"{i}: {t}"}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(texts)))
    tokenize_corpus(corpus, tokenizer, TokenizeConfig(val_fraction=0.1), seed=0, out_dir=work / "artifacts/tokens")
    save_tokenizer(tokenizer, work / "artifacts/tokenizer")
    (work / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return work


def _set_params(work: Path, **sections) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params.update(sections)
    (work / "params.yaml").write_text(yaml.safe_dump(params))


def _start(work: Path, n_procs: int = 1, launcher: str = "torchrun") -> subprocess.Popen:
    """The pretrain stage as DVC runs it, or with n_procs under torchrun (as a module) or DeepSpeed's
    launcher (the script by path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if n_procs == 1:
        cmd = [sys.executable, "-m", "stages.pretrain"]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(port), "--num_gpus", str(n_procs),
               str(ROOT / "stages/pretrain.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_procs),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "stages.pretrain"]
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(work: Path, n_procs: int = 1, launcher: str = "torchrun") -> str:
    proc = _start(work, n_procs, launcher)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def _loss_curve(work: Path) -> list[float]:
    rows = (work / "reports/live/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows]


def _weights(work: Path) -> dict:
    return load_file(str(work / "artifacts/pretrain/model.safetensors"))


def _assert_same_run(work: Path, reference: Path, exact: bool = False) -> None:
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(torch.tensor(_loss_curve(work)), torch.tensor(_loss_curve(reference)), **tolerance)
    one, two = _weights(reference), _weights(work)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], **tolerance)


@pytest.mark.parametrize("launch", ["torchrun DDP", "params: deepspeed ZeRO-2", "deepspeed launcher: ZeRO-1"])
def test_two_processes_train_what_one_does(tmp_path, tokenizer, launch):
    single, double = _workdir(tmp_path, tokenizer, "one"), _workdir(tmp_path, tokenizer, "two")
    _run(single)
    if launch == "torchrun DDP":
        _run(double, n_procs=2)
    # the stage relaunches itself, as `dvc exp run -S distributed.nproc=2` would
    elif launch == "params: deepspeed ZeRO-2":
        _set_params(double, distributed={"nproc": 2, "strategy": "deepspeed", "zero_stage": 2})
        _run(double)
    else:  # `deepspeed --num_gpus 2 stages/pretrain.py`: DeepSpeed's own launcher, the script by path
        _set_params(double, distributed={"strategy": "deepspeed", "zero_stage": 1})
        _run(double, n_procs=2, launcher="deepspeed")
    assert len(_loss_curve(single)) == 4
    _assert_same_run(double, single)
    summary = json.loads((double / "reports/metrics/pretrain.json").read_text())
    assert summary["processes"] == 2 and summary["tokens_seen"] == 20 * 2 * 4 * 32  # the global batch


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, tokenizer):
    """kill -9, then resume: on 1 process (bit-exact), on 2 (DDP), and on 2 with DeepSpeed ZeRO-3."""
    # killed after the checkpoint of step 40, with an evaluation (its best weights so far) behind it and three ahead
    long_run = {"pretrain": {**PARAMS["pretrain"], "max_steps": 120, "log_interval": 10, "eval_interval": 30},
                "checkpoint": {"interval": 20, "keep": 2}}
    reference, killed = _workdir(tmp_path, tokenizer, "reference"), _workdir(tmp_path, tokenizer, "killed")
    for work in (reference, killed):
        _set_params(work, **long_run)
    _run(reference)
    assert not (reference / "checkpoints/pretrain").exists()  # a finished stage clears its resume points

    proc = _start(killed)
    deadline = time.time() + 120
    while not (killed / "checkpoints/pretrain/step-00000040").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    assert not (killed / "artifacts/pretrain").exists()
    for name, distributed in [("one", {}), ("ddp", {"nproc": 2}),
                              ("zero3", {"nproc": 2, "strategy": "deepspeed", "zero_stage": 3})]:
        work = tmp_path / f"resumed-{name}"
        shutil.copytree(killed, work)
        _set_params(work, distributed=distributed)
        log = _run(work)
        resumed = r"resuming from checkpoints/pretrain/step-0000\d\d[02468]0 \(step \d+ of 120, written by 1 "
        assert re.search(resumed, log)
        _assert_same_run(work, reference, exact=name == "one")


def test_rank_shares_split_the_rows_and_keep_each_dpo_pair_together():
    from tinyllm.train.distributed import Dist, rank_share

    # a DPO batch of 4 pairs: rows 0-3 chosen, rows 4-7 their rejected; pair i has references (-10i, -10i - 1)
    batch = {"input_ids": torch.arange(8)[:, None].repeat(1, 3),
             "ref_logps": torch.tensor([0.0, -10, -20, -30, -1, -11, -21, -31])}
    shares = [next(rank_share([batch], Dist(rank=r, world_size=2))) for r in (0, 1)]
    rows = sorted(int(i) for share in shares for i in share["input_ids"][:, 0])
    assert rows == list(range(8))  # every row once
    for share in shares:
        chosen, rejected = share["ref_logps"].chunk(2)
        assert torch.equal(chosen - rejected, torch.ones(2))  # each chosen row still faces its own rejected row
    assert next(rank_share([batch], Dist())) is batch  # one process: untouched


def test_rank_losses_average_to_the_global_token_mean_even_with_an_empty_share():
    from tinyllm.config import ModelConfig
    from tinyllm.data.labels import IGNORE_INDEX
    from tinyllm.model.transformer import Transformer
    from tinyllm.train.distributed import Dist, rank_share
    from tinyllm.train.objectives import NextTokenLoss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                                    vocab_size=50))
    ids = torch.randint(0, 50, (4, 17))
    labels = ids[:, 1:].clone()
    labels[1::2] = IGNORE_INDEX  # rank 1's rows (1 and 3) hold no labelled token
    labels[0, :10] = IGNORE_INDEX  # and rank 0's rows hold different numbers of them
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    whole, _ = NextTokenLoss()(model, batch)
    shares = [NextTokenLoss()(model, next(rank_share([batch], Dist(rank=r, world_size=2))))[0] for r in (0, 1)]
    assert all(torch.isfinite(s) for s in shares)
    torch.testing.assert_close((shares[0] + shares[1]) / 2, whole)  # what DDP's gradient mean sees


FINISH_PROBE = """
import gc, sys, weakref, torch
from tinyllm import bench
from tinyllm.config import ModelConfig, RuntimeConfig, TrainConfig
from tinyllm.model.transformer import Transformer
from tinyllm.train.distributed import Dist
from tinyllm.train.engine import make_engine
from tinyllm.train.objectives import NextTokenLoss

torch.manual_seed(0)
model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                                vocab_size=100))
engine = make_engine(model, TrainConfig(max_steps=2, batch_size=2, warmup_steps=1), RuntimeConfig(device="cpu"),
                     Dist(), torch.device("cpu"), torch.float32, bench.STRATEGIES[sys.argv[1]])
engine.forward_backward(NextTokenLoss(), next(bench.random_batches(100, 2, 16)), True)
engine.complete_step()
import deepspeed.comm.comm
print("shm_comm_op", deepspeed.comm.comm.cdb.shm_comm_op)  # not compiled on a CPU: gloo reduces
alive = [weakref.ref(engine.engine), weakref.ref(engine.engine.optimizer)]
engine.finish()
gc.collect()
print("alive", sum(ref() is not None for ref in alive), "attrs", sum(len(vars(p)) for p in model.parameters()),
      "finite", bool(torch.isfinite(model(torch.randint(0, 100, (1, 8))).logits).all()))
"""


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_finish_frees_the_engine_and_leaves_a_plain_module(strategy):
    """After a stage, the DeepSpeed engine, its optimizer and ZeRO-3's per-parameter state are gone
    (so the full weights never sit next to them), and the module still runs on its own. In a child
    process: DeepSpeed keeps its process group in module globals. On the CPU, DeepSpeed has not
    compiled its shared-memory all-reduce (about 45 s on a fresh machine)."""
    proc = subprocess.run([sys.executable, "-c", FINISH_PROBE, strategy], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm_comm_op None" in proc.stdout and "alive 0 attrs 0 finite True" in proc.stdout
