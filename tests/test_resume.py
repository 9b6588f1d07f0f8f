"""Resumable checkpoints inside `fit`: a crashed run continues to exactly where an uninterrupted run
ends; a damaged newest checkpoint falls back to the one before; a NaN stops the run and keeps the
last good checkpoint. (Killing real stage processes, and resuming on other process counts or with
DeepSpeed, is in test_distributed.py.)"""

import json
import logging
import shutil
import threading

import pytest
import torch

from tinyllm.config import CheckpointConfig, ModelConfig, RuntimeConfig, TrainConfig
from tinyllm.errors import NonFiniteLossError
from tinyllm.model.transformer import Transformer
from tinyllm.train import resume
from tinyllm.train.distributed import TrainingRun
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss

CFG = TrainConfig(max_steps=24, batch_size=4, lr=3e-3, warmup_steps=3, log_interval=4, eval_interval=100)
CPU = RuntimeConfig(device="cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                                   vocab_size=64, dropout=0.1))  # dropout: the RNG state must resume too


def _batches():
    """A plain generator (no state()): a resume must skip the micro-batches already used."""
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, 64, (4, 17), generator=g)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


class CrashAt:
    """The real objective, until call `n`: then the process 'dies'."""

    def __init__(self, n, poison=False):
        self.n, self.calls, self.poison = n, 0, poison

    def __call__(self, model, batch):
        self.calls += 1
        loss, extras = NextTokenLoss()(model, batch)
        if self.calls >= self.n:
            if self.poison:
                return loss * float("nan"), extras
            raise KeyboardInterrupt("killed")
        return loss, extras


def _run(tmp_path, keep=2):
    """Checkpoints every 5 steps, written at the next log point (every 4): steps 8, 12, 16, 20."""
    return TrainingRun(checkpoint=CheckpointConfig(interval=5, keep=keep), checkpoint_dir=tmp_path / "ckpt")


def _uninterrupted():
    model = _model()
    result = fit(model, NextTokenLoss(), _batches(), CFG, CPU)
    return model.state_dict(), result


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_crashed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, caplog):
    reference, ref_result = _uninterrupted()
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), CrashAt(18), _batches(), CFG, CPU, run=_run(tmp_path))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000012", "step-00000016"]  # keep 2
    model = _model()
    with caplog.at_level(logging.INFO):
        result = fit(model, NextTokenLoss(), _batches(), CFG, CPU, run=_run(tmp_path))
    assert "step-00000016 (step 16 of 24" in caplog.text
    _assert_same_weights(model.state_dict(), reference)
    assert [h["train/loss"] for h in result.history] == [h["train/loss"] for h in ref_result.history]


def test_a_corrupted_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog):
    reference, _ = _uninterrupted()
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), CrashAt(18), _batches(), CFG, CPU, run=_run(tmp_path, keep=3))
    newest = tmp_path / "ckpt/step-00000016/model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated write
    (tmp_path / "ckpt/step-00000012/optimizer.safetensors").write_bytes(b"garbage")  # and a corrupted one
    model = _model()
    with caplog.at_level(logging.INFO):
        fit(model, NextTokenLoss(), _batches(), CFG, CPU, run=_run(tmp_path))
    assert "step-00000016: model.safetensors is truncated or corrupted" in caplog.text
    assert "step-00000012: optimizer.safetensors is truncated or corrupted" in caplog.text
    assert "step-00000008 (step 8 of 24" in caplog.text  # the last intact one
    _assert_same_weights(model.state_dict(), reference)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        fit(_model(seed=1), CrashAt(18), _batches(), CFG, CPU, run=_run(tmp_path))
    reference, _ = _uninterrupted()
    model = _model(seed=0)  # other starting weights: a different run
    with caplog.at_level(logging.WARNING):
        fit(model, NextTokenLoss(), _batches(), CFG, CPU, run=_run(tmp_path))
    assert "written by a different run" in caplog.text
    _assert_same_weights(model.state_dict(), reference)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, caplog):
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 13.*step-00000012, is kept"):
        fit(_model(), CrashAt(13, poison=True), _batches(), CFG, CPU, run=_run(tmp_path))
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["step-00000008", "step-00000012"]  # nothing written after the NaN
    state = json.loads((tmp_path / "ckpt/step-00000012/state.json").read_text())
    assert state["step"] == 12 and all(h["train/loss"] == h["train/loss"] for h in state["history"])  # no NaN
    model = _model()  # and the run resumes from it
    with caplog.at_level(logging.INFO):
        result = fit(model, NextTokenLoss(), _batches(), CFG, CPU, run=_run(tmp_path))
    assert "step-00000012 (step 12 of 24" in caplog.text
    assert result.history[-1]["step"] == 24 and all(torch.isfinite(p).all() for p in model.parameters())


def test_the_training_code_is_part_of_a_runs_identity(tmp_path, monkeypatch):
    """A run resumed after the packing or the model changed would match neither version: an edit
    under data/, model/, train/ or config.py makes another run; one elsewhere (serving) does not."""
    package = tmp_path / "tinyllm"
    shutil.copytree(resume.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = resume.code_digest.__wrapped__(package)
    serving = package / "serve" / "api.py"
    serving.write_text(serving.read_text() + "\n# a comment\n")
    assert resume.code_digest.__wrapped__(package) == before
    packing = package / "data" / "chat.py"
    packing.write_text(packing.read_text() + "\n# a comment\n")
    assert resume.code_digest.__wrapped__(package) != before
    model = _model()
    fingerprint = resume.run_fingerprint(model, {"batch_size": 4})
    monkeypatch.setattr(resume, "code_digest", lambda: "other code")
    assert resume.run_fingerprint(model, {"batch_size": 4}) != fingerprint


class RecordAt:
    """The real objective; at call `n` it first records the weights the step starts from, and at
    call `later` it sets `reached`."""

    def __init__(self, n, later):
        self.n, self.later, self.calls, self.weights = n, later, 0, None
        self.reached = threading.Event()

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.calls == self.later:
            self.reached.set()
        return NextTokenLoss()(model, batch)


def test_a_resume_point_is_written_while_training_goes_on_and_holds_its_steps_weights(tmp_path, monkeypatch):
    """The write of step 8's resume point waits until step 10 has started, so it can only finish if
    training went on meanwhile; what it writes must still be step 8's weights, not the live
    parameters (on the CPU, `.cpu()` of a parameter is the parameter itself: the engine copies)."""
    recorder = RecordAt(9, later=11)  # call 9 starts from the weights saved after step 8
    write = resume.save_resume_point

    def write_once_step_10_runs(*args, **kwargs):
        assert recorder.reached.wait(timeout=60), "training waited for the write"
        return write(*args, **kwargs)

    monkeypatch.setattr(resume, "save_resume_point", write_once_step_10_runs)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=3, log_interval=4, eval_interval=100)
    fit(_model(), recorder, _batches(), cfg, CPU, run=_run(tmp_path))  # one resume point: step 8
    fingerprint = json.loads((tmp_path / "ckpt/step-00000008/state.json").read_text())["fingerprint"]
    written = resume.load_newest(tmp_path / "ckpt", fingerprint)
    assert written.step == 8 and written.weights.keys() == recorder.weights.keys() - {"lm_head.weight"}
    for name, tensor in written.weights.items():
        assert torch.equal(tensor, recorder.weights[name]), name


def test_a_failed_background_write_is_raised_where_it_is_waited_for():
    writer = resume.BackgroundWriter()

    def full_disk():
        raise OSError("No space left on device")

    writer.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # raised once, then clear


def test_a_failed_resume_point_write_is_raised_but_never_hides_the_error_that_stopped_training(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(resume, "save_resume_point", full_disk)
    with pytest.raises(OSError, match="No space left"):  # a run that ends well raises its failed write
        fit(_model(), NextTokenLoss(), _batches(), CFG, CPU, run=_run(tmp_path))
    with pytest.raises(KeyboardInterrupt):  # the write at step 8 failed, then training was stopped
        fit(_model(), CrashAt(10), _batches(), CFG, CPU, run=_run(tmp_path))
