"""Compile the post-training stages' steps while pretraining runs, so that theirs come from the cache.

On a GPU a cold `torch.compile` of a stage's step took 20-40 s of its start-up (reports/gpu_speed.md),
while a second process compiling the same graph, whatever its weights, reads Inductor's cache on
disk in a few seconds (SFT does, after pretraining). The graphs of lora, dpo and grpo depend on the
model's shape, the params and the data, all known before pretraining starts; not on the weights.
So the pretrain stage starts one process per later stage, which trains that stage for one step
from random weights into a temporary folder (for eval: decodes one token at eval's batch size,
its one compiled graph), and waits for them before it ends:

    with compile_ahead(params, run.dist):     # stages/pretrain.py
        run_pretrain(...)

    python -m stages.compile_ahead lora       # one of them, by hand

Compiling is work on the host's other cores; each process also runs its one step on the GPU beside
pretraining (at a lower CPU priority), which cost pretraining 2-3% of its tokens/s on an H100.
Only the compile cache is written; a process that fails leaves its stage to compile for itself,
and pretraining goes on (if pretraining fails, they are stopped). `runtime.compile_ahead: false`
turns this off.

Pretraining's own step is compiled ahead the same way, from random tokens, by a process the first
data stage starts (`tinyllm/pretrain_ahead.py`): `python -m stages.compile_ahead pretrain`.

Not a DVC stage: this file is a dep of pretrain (it runs inside it). The processes run the later
stages' code (imported by name, `stages.<stage>`) on their params and inputs (chat tokens,
preference pairs, prompts), which pretrain does not declare: they change no output, only what is
in the compile cache, and a stale input only costs the stage its cache hit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinyllm import pretrain_ahead
from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.data.tokens import random_tokens
from tinyllm.errors import TrainingError
from tinyllm.stage import stage_main
from tinyllm.train.checkpoint import save_checkpoint
from tinyllm.train.distributed import Dist
from tinyllm.train.pretrain import build_model, run_pretrain
from tinyllm.train.runtime import compiled_graphs, compiles, resolve_device

log = logging.getLogger(__name__)
TOKENIZER = Path("artifacts/tokenizer")
STAGES = ("lora", "dpo", "grpo", "eval")


def compiles_ahead(params, dist) -> bool:
    """Whether steps are compiled ahead: where the stages compile and each trains in one process (not
    under torchrun, whatever the params say: DDP's graphs differ, and every rank would start its own)."""
    return not (params.runtime.compile_ahead is False or not compiles(params.runtime, resolve_device(params.runtime))
                or dist.enabled or params.distributed.nproc != 1 or params.distributed.strategy != "ddp")


def stages_ahead(params, dist) -> list[str]:
    """The later stages whose graphs are compiled ahead while pretraining runs: all of them where
    `compiles_ahead`. A switched-off stage's process ends at once; pretraining reads none of their
    params."""
    return list(STAGES) if compiles_ahead(params, dist) else []


@contextlib.contextmanager
def compile_ahead(params, dist, wait_seconds: float = 600):
    """Run the block while one process per later stage compiles its step (`stages_ahead`; the block
    gets them, by stage); then wait for them (at most `wait_seconds` from the start) and log how
    each went, with the end of the output of one that failed. If the block raises, they are
    stopped at once. Before the block, pretraining's own step compiled while the data was made
    is waited for where steps are compiled ahead, and stopped where not (graphs this run would not
    use: several processes, say; `tinyllm.pretrain_ahead`)."""
    started = time.perf_counter()
    with contextlib.ExitStack() as outputs:
        running = {}
        try:
            stages = stages_ahead(params, dist)
            for stage in stages:
                output = outputs.enter_context(tempfile.TemporaryFile())
                running[stage] = output, subprocess.Popen(
                    [sys.executable, "-m", "stages.compile_ahead", stage], stdout=output, stderr=subprocess.STDOUT)
            if stages:
                pretrain_ahead.wait()
            else:
                pretrain_ahead.stop()
            yield {stage: process for stage, (_, process) in running.items()}
        except BaseException:
            for _, process in running.values():
                process.kill()
                process.wait()
            raise
        block_done = time.perf_counter()
        for stage, (output, process) in running.items():
            try:
                code = process.wait(timeout=max(1.0, wait_seconds - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code = "killed: too long"
            if code == 0:
                log.info("compile ahead: %s compiled (pretraining waited %.0f s more for it)", stage,
                         time.perf_counter() - block_done)
            else:
                output.seek(0)
                tail = output.read().decode(errors="replace").splitlines()[-5:]
                log.warning("compile ahead: %s failed (%s; the stage compiles for itself):\n  %s", stage, code,
                            "\n  ".join(tail))


def one_step(params, stage: str):
    """`params` with `stage` trained for one step: what compiles is the same, the rest is skipped."""
    train = dataclasses.replace(getattr(params, stage), max_steps=1, warmup_steps=0)
    return dataclasses.replace(params, **{stage: train})


def compile_pretraining(params) -> None:
    """Pretraining for one step on random tokens, where `compiles_ahead`; the pretrain stage waits
    for it (`tinyllm.pretrain_ahead.wait`) and then reads its graphs from the cache."""
    try:
        if not compiles_ahead(params, Dist()):
            log.info("pretrain: its step is not compiled ahead with these params")
            return
        vocab_size = params.tokenizer.vocab_size  # the trained tokenizer's size (it is filled to it)
        cfg = params.pretrain
        window = (cfg.seq_len or params.model.max_seq_len) + 1  # a batch row's tokens, its labels' last too
        rows = {"train": cfg.batch_size * cfg.grad_accum + 1, "val": cfg.eval_batches + 1}
        with tempfile.TemporaryDirectory() as folder:
            tokens = random_tokens(Path(folder) / "tokens", vocab_size,
                                   {split: n * window for split, n in rows.items()})
            # no tokenizer in its checkpoint: the data stages may be writing it
            run_pretrain(one_step(params, "pretrain"), tokens, None, Path(folder) / "out")
    finally:
        pretrain_ahead.finished()


@stage_main(parses_arguments=True)
def main(params):
    parser = argparse.ArgumentParser(description="Train a stage for one step from random weights, to compile it.")
    parser.add_argument("stage", choices=("pretrain", *STAGES))
    stage = parser.parse_args().stage
    if stage == "pretrain":  # nothing else trains yet
        compile_pretraining(params)
        return
    if hasattr(os, "nice"):
        os.nice(10)  # pretraining first
    if not getattr(getattr(params, stage), "enabled", True):
        log.info("%s: %s.enabled is false, nothing to compile", stage, stage)
        return
    with tempfile.TemporaryDirectory() as folder:
        init = Path(folder) / "init"
        model = build_model(params, load_tokenizer(TOKENIZER).get_vocab_size())
        save_checkpoint(model, init, meta={"stage": "compile_ahead"}, tokenizer_dir=TOKENIZER)
        if stage == "eval":
            importlib.import_module("stages.eval").compile_decode_step(params, init)
            return
        try:
            importlib.import_module(f"stages.{stage}").train(one_step(params, stage), init, Path(folder) / "out")
        except TrainingError as err:  # after one step a check of the whole run may fail (DPO's margin is 0)
            if not compiled_graphs():
                raise
            log.info("%s: compiled; after one step the stage's own check says: %s", stage, err)


if __name__ == "__main__":
    main()
