"""Resumable checkpoints: everything needed to continue a training run exactly where it stopped.

    checkpoints/<stage>/step-00000400/
        model.safetensors       full fp32 weights, named as in the stage's final checkpoint
        optimizer.safetensors   Adam moments per parameter name, and the step count
        rng.safetensors         each process's torch (and CUDA) random state
        best.safetensors        the weights of the lowest validation loss so far (only when there are some)
        state.json              step, data position, metrics so far, the run's fingerprint and
                                the sha256 of each file above; written last

A checkpoint is written into a temporary folder and renamed into place. One whose state.json is
missing or whose files do not hash to what it records (a crash while copying, a full disk, a
truncated file) is skipped with a warning and the one before it is used. Only tensors and JSON are
read back: nothing is unpickled. State is keyed by parameter name, not by process, so a run
resumes on another number of processes or with another strategy (DDP <-> DeepSpeed ZeRO).

The learning-rate schedule is a function of the step (`loop.lr_at`), so the step is all of its state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinyllm.folders import replaced_folder

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
TRAINING_CODE = ("config.py", "data", "model", "train", "infer", "eval/verify.py")
"""The source that decides what a training step computes: params, data packing, the model, the
loop, and for grpo the rollouts' sampling and the reward."""
STATE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
BEST = "best.safetensors"
NAME = re.compile(r"step-(\d{8})")


@dataclass
class ResumePoint:
    path: Path
    step: int
    state: dict
    """state.json: step, micro_batches, data (the batches' own position, or None), history, world_size."""
    weights: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]


def run_fingerprint(model: torch.nn.Module, parts: dict, inputs=()) -> str:
    """What makes two runs the same run: the starting weights, the batch geometry (`parts`), the
    content of the input files and the training code (`code_digest`: a run resumed after the
    packing or the model changed would be neither the old run nor the new one). Learning rate and
    step count are not part of it, so a run can be resumed with a lower lr after a divergence or
    extended to more steps."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(code_digest().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for path in inputs:
        digest.update(_sha256(Path(path)).encode())
    return digest.hexdigest()


@functools.cache
def code_digest(root: Path = PACKAGE) -> str:
    """sha256 over the Python files of `TRAINING_CODE` under `root`, by relative path."""
    digest = hashlib.sha256()
    for part in TRAINING_CODE:
        files = [root / part] if part.endswith(".py") else sorted((root / part).rglob("*.py"))
        for path in files:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(_sha256(path).encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_resume_point(directory: Path, step: int, weights: dict, optim: dict, rng: dict, state: dict,
                      keep: int, best: dict | None = None) -> Path:
    """Write step-<step>/ atomically, then delete all but the newest `keep` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = step_dir(directory, step)
    files = dict(zip(FILES, (weights, optim, rng)), **({BEST: best} if best else {}))
    with replaced_folder(final) as tmp:  # step-N.tmp: not a step folder to _steps
        for name, tensors in files.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
        state = {**state, "step": step, "sha256": {name: _sha256(tmp / name) for name in files}}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    for old in sorted(_steps(directory), reverse=True)[keep:]:
        shutil.rmtree(old[1])
    return final


class BackgroundWriter:
    """Runs one write at a time on a thread of its own, so that training goes on meanwhile: a
    resume point of the GPU preset's model is about 1 GB to serialise and hash, 2-3 s each time,
    every 200 steps of an 80 s pretraining. What it is handed must not change while it writes
    (copies, not the live parameters). `wait` returns once the last write is done, raising its
    error if it failed. The thread is not a daemon: a process that stops on an error still
    finishes the write (into a scratch folder, renamed when complete) before it exits."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as err:  # raised in the training thread by wait
                log.exception("writing a resume point failed (the training goes on; the error is raised "
                              "at the next resume point or when training ends)")
                self._error = err

        self._thread = threading.Thread(target=run, name="resume-point-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def _steps(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.fullmatch(p.name))]


def load_newest(directory: Path, fingerprint: str) -> ResumePoint | None:
    """The newest intact checkpoint of this run (same fingerprint), or None to start over."""
    for step, path in sorted(_steps(directory), reverse=True):
        state, problem = _read_state(path, fingerprint)
        if problem:
            log.warning("%s: %s; trying an older checkpoint", path, problem)
            continue
        tensors = [load_file(str(path / name)) for name in FILES]
        best = load_file(str(path / BEST)) if BEST in state["sha256"] else {}
        return ResumePoint(path, step, state, *tensors, best)
    return None


def _read_state(path: Path, fingerprint: str) -> tuple[dict, str | None]:
    """(state.json, None) for an intact checkpoint of this run, else ({}, what is wrong)."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return {}, f"{STATE} is missing or unreadable (the write did not finish)"
    if state.get("fingerprint") != fingerprint:
        return {}, "written by a different run (other starting weights, batch geometry, data or training code)"
    for name in sorted({*FILES, *state["sha256"]}):  # the best weights, when the state lists them
        if not (path / name).exists() or _sha256(path / name) != state["sha256"].get(name):
            return {}, f"{name} is truncated or corrupted (sha256 differs from {STATE})"
    return state, None


def clear(directory: Path) -> None:
    """Remove a finished stage's resumable checkpoints: its output checkpoint now holds the result."""
    shutil.rmtree(directory, ignore_errors=True)


def rng_states(dist) -> dict[str, torch.Tensor]:
    """Every process's torch random state (and its GPU's), gathered so rank 0 can save them."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    states = [mine]
    if dist.enabled:
        states = [None] * dist.world_size
        torch.distributed.all_gather_object(states, mine)
    return {f"{kind}.rank{rank}": t.cpu() for rank, s in enumerate(states) for kind, t in s.items()}


def restore_rng(rng: dict[str, torch.Tensor], dist) -> None:
    """Each process takes back its own state (process r % N when the run had N processes)."""
    saved = len([k for k in rng if k.startswith("cpu.")])
    rank = dist.rank % saved
    torch.set_rng_state(rng[f"cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"])
