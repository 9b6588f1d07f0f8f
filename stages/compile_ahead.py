"""Compile the post-training stages' steps while pretraining runs, so that theirs come from the cache.

On a GPU a cold `torch.compile` of a stage's step took 20-40 s of its start-up (reports/gpu_speed.md),
while a second process compiling the same graph, whatever its weights, reads Inductor's cache on
disk in a few seconds (SFT does, after pretraining). The graphs of lora, dpo and grpo depend on the
model's shape, the params and the data, all known before pretraining starts; not on the weights.
So the pretrain stage starts one process per later stage, which trains that stage for one step
from random weights into a temporary folder (eval: scores them, for its decode step's 11-15 s
compile), and waits for them before it ends:

    with compile_ahead(params):     # stages/pretrain.py
        run_pretrain(...)

    python -m stages.compile_ahead lora     # one of them, by hand

They use the host's idle cores while pretraining keeps the GPU busy. Only the compile cache is
written; a process that fails leaves the stage to compile for itself, and pretraining goes on.
`runtime.compile_ahead: false` turns this off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
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


def stages_ahead(params) -> list[str]:
    """The later stages whose steps are compiled ahead: all of them where the stages compile and train
    in one process (a switched-off stage's process ends at once; pretraining reads none of their params)."""
    if (params.runtime.compile_ahead is False or not compiles(params.runtime, resolve_device(params.runtime))
            or params.distributed.nproc != 1 or params.distributed.strategy != "ddp"):
        return []
    return list(STAGES)


@contextlib.contextmanager
def compile_ahead(params, wait_seconds: float = 600):
    """Run the block while one process per later stage compiles its step (`stages_ahead`); then
    wait for them (at most `wait_seconds` in all) and log how each went, with the end of the
    output of one that failed."""
    started = time.perf_counter()
    with contextlib.ExitStack() as outputs:
        running = {}
        for stage in stages_ahead(params):
            output = outputs.enter_context(tempfile.TemporaryFile())
            running[stage] = output, subprocess.Popen([sys.executable, "-m", "stages.compile_ahead", stage],
                                                      stdout=output, stderr=subprocess.STDOUT)
        try:
            yield list(running)
        finally:
            for stage, (output, process) in running.items():
                try:
                    code = process.wait(timeout=max(1.0, wait_seconds - (time.perf_counter() - started)))
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = "killed: too long"
                took = time.perf_counter() - started
                if code == 0:
                    log.info("compile ahead: %s compiled, %.0f s after pretraining started", stage, took)
                else:
                    output.seek(0)
                    tail = output.read().decode(errors="replace").splitlines()[-5:]
                    log.warning("compile ahead: %s failed (%s; the stage compiles for itself):\n  %s", stage, code,
                                "\n  ".join(tail))


def one_step(params, stage: str):
    """`params` with `stage` trained for one step: what compiles is the same, the rest is skipped."""
    train = dataclasses.replace(getattr(params, stage), max_steps=1, warmup_steps=0)
    return dataclasses.replace(params, **{stage: train})


@stage_main
def main(params):
    stage = sys.argv[1]
    if not getattr(getattr(params, stage), "enabled", True):
        log.info("%s: %s.enabled is false, nothing to compile", stage, stage)
        return
    with tempfile.TemporaryDirectory() as folder:
        init = Path(folder) / "init"
        model = build_model(params, load_tokenizer(TOKENIZER).get_vocab_size())
        save_checkpoint(model, init, meta={"stage": "sft"}, tokenizer_dir=TOKENIZER)  # eval: a chat model's parts
        module = importlib.import_module(f"stages.{stage}")
        if stage == "eval":  # its decode step (batched generation at eval's batch size, on the GPU)
            module.score(params, init)
            return
        try:
            module.train(one_step(params, stage), init, Path(folder) / "out")
        except TrainingError as err:  # after one step a check of the whole run may fail (DPO's margin is 0)
            if not compiled_graphs():
                raise
            log.info("%s: compiled; after one step the stage's own check says: %s", stage, err)


if __name__ == "__main__":
    main()
