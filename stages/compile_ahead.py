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

from tinyllm.data.tokenizer import load_tokenizer
from tinyllm.errors import TrainingError
from tinyllm.stage import stage_main
from tinyllm.train.checkpoint import save_checkpoint
from tinyllm.train.pretrain import build_model
from tinyllm.train.runtime import compiled_graphs, compiles, resolve_device

log = logging.getLogger(__name__)
TOKENIZER = Path("artifacts/tokenizer")
STAGES = ("lora", "dpo", "grpo", "eval")


def stages_ahead(params, dist) -> list[str]:
    """The later stages whose graphs are compiled ahead: all of them where the stages compile and each
    trains in one process (not under torchrun, whatever the params say: DDP's graphs differ, and every
    rank would start its own). A switched-off stage's process ends at once; pretraining reads none of
    their params."""
    if (params.runtime.compile_ahead is False or not compiles(params.runtime, resolve_device(params.runtime))
            or dist.enabled or params.distributed.nproc != 1 or params.distributed.strategy != "ddp"):
        return []
    return list(STAGES)


@contextlib.contextmanager
def compile_ahead(params, dist, wait_seconds: float = 600):
    """Run the block while one process per later stage compiles its step (`stages_ahead`; the block
    gets them, by stage); then wait for them (at most `wait_seconds` from the start) and log how
    each went, with the end of the output of one that failed. If the block raises, they are
    stopped at once."""
    started = time.perf_counter()
    with contextlib.ExitStack() as outputs:
        running = {}
        try:
            for stage in stages_ahead(params, dist):
                output = outputs.enter_context(tempfile.TemporaryFile())
                running[stage] = output, subprocess.Popen(
                    [sys.executable, "-m", "stages.compile_ahead", stage], stdout=output, stderr=subprocess.STDOUT)
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


@stage_main(parses_arguments=True)
def main(params):
    parser = argparse.ArgumentParser(description="Train a stage for one step from random weights, to compile it.")
    parser.add_argument("stage", choices=STAGES)
    stage = parser.parse_args().stage
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
