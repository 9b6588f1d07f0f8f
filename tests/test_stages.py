"""Stage scripts fail on user mistakes with one line naming the param or file:line, exit status 2."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_stage(cwd: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def write_params(cwd: Path, **sections) -> None:
    (cwd / "params.yaml").write_text(yaml.safe_dump(sections, allow_unicode=True))


def test_impossible_params_fail_with_the_param_named(tmp_path):
    write_params(tmp_path, model={"dim": 100, "n_heads": 3})
    proc = run_stage(tmp_path, "prepare")
    assert proc.returncode == 2
    assert "model.dim=100 must be divisible by model.n_heads=3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_user_corpus_names_file_and_line_and_writes_nothing(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "第一行"}\n{"text": "第二行"\n{"text": "第三行"}\n', encoding="utf-8")
    write_params(tmp_path, data={"source": "files", "pretrain": [str(corpus)], "strict": True})
    proc = run_stage(tmp_path, "prepare")
    assert proc.returncode == 2
    assert f"{corpus}:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts/data/pretrain.jsonl").exists()
    assert not (tmp_path / "reports/metrics/prepare.json").exists()


def test_bad_lines_are_counted_and_logged_by_default(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "第一行"}\nnot json\n{"txt": 1}\n{"text": "第四行"}\n', encoding="utf-8")
    write_params(tmp_path, data={"source": "files", "pretrain": [str(corpus)]})
    proc = run_stage(tmp_path, "prepare")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "reports/metrics/prepare.json").read_text())
    assert stats["documents"] == 2 and stats["bad_lines_skipped"] == 2
    assert f"{corpus}:2:" in proc.stderr and f"{corpus}:3:" in proc.stderr


def test_missing_input_says_which_stage_to_run(tmp_path):
    write_params(tmp_path)
    proc = run_stage(tmp_path, "tokenize_corpus")
    assert proc.returncode == 2
    assert "dvc repro train_tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_a_stage_prints_its_docstring_on_help_and_refuses_other_arguments(tmp_path):
    """A stage reads params.yaml only: `--help` must not train and overwrite the stage's outputs
    (it used to run the whole stage), and an argument that looks like a setting is refused, not ignored.
    The ZeRO-1 case of test_distributed runs DeepSpeed's launcher, which adds --local_rank=N."""
    write_params(tmp_path)
    for flag in ("--help", "-h"):
        helped = run_stage(tmp_path, "sft", flag)
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith("Stage sft:") and "params.yaml" in helped.stdout
    refused = run_stage(tmp_path, "prepare", "--local_rank=0", "--local-rank=0", "--max_steps", "5")
    assert refused.returncode == 2
    assert "a stage takes no arguments, got '--max_steps 5'" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]


def test_eval_prompts_that_are_not_objects_are_named_by_line(tmp_path):
    from tinyllm.errors import DataError
    from tinyllm.eval.report import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "你是谁？"}\n"hi"\n')
    try:
        read_prompts(str(path))
    except DataError as err:
        assert str(err).startswith(f"{path}:2:") and "object" in str(err)
    else:
        raise AssertionError("a JSON string line was accepted as a prompt")


STAGE_THAT_LEAVES_WORK = """
import atexit, concurrent.futures, threading, time
from pathlib import Path
from tinyllm.stage import stage_main

POOL = concurrent.futures.ThreadPoolExecutor(1)  # left running to the end, as the compile workers' pool is

@stage_main
def main(params):
    POOL.submit(print, end="")
    def write_late():
        time.sleep(0.5)
        Path("thread.txt").write_text("written")
    threading.Thread(target=write_late).start()
    atexit.register(lambda: Path("atexit.txt").write_text(str(params.seed)))
    print("no newline, so still in the buffer", end="")

main()
"""


def test_a_stage_that_ends_well_skips_teardown_but_not_its_threads_atexit_handlers_or_output(tmp_path):
    """stage_main leaves with os._exit once the stage is done (the interpreter's teardown took 1.1-1.6 s
    after a compiled stage): a thread that is not a daemon still finishes, atexit handlers still run,
    what is buffered on stdout still comes out, and a thread pool left running does not stop it."""
    write_params(tmp_path, seed=7)
    (tmp_path / "leaves_work.py").write_text(STAGE_THAT_LEAVES_WORK)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # stdout buffered
    proc = subprocess.run([sys.executable, "leaves_work.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "no newline, so still in the buffer"
    assert (tmp_path / "thread.txt").read_text() == "written" and (tmp_path / "atexit.txt").read_text() == "7"


STAGE_THAT_COMPILED = """
import atexit, os
from pathlib import Path
from torch._inductor.async_compile import AsyncCompile
from tinyllm.stage import stage_main

@stage_main
def main(params):
    pool = AsyncCompile.process_pool()  # torch's compile workers, as compiling on a GPU starts them
    Path("pids.txt").write_text(f"{pool.process.pid} {pool.submit(os.getpid).result()}")  # the helper, a worker
    atexit.register(lambda: Path("running.txt").write_text(str(pool.running)))  # the first handler to run

main()
"""


def ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # (an orphan the container need not reap)
    except psutil.NoSuchProcess:
        return True


def test_a_stage_does_not_wait_for_its_compile_workers_to_stop(tmp_path):
    """torch's exit handlers stop the compile workers' pool by a message to its helper process and
    wait for it (1.06 s here for two workers); a stage marks the pool stopped instead, and the helper
    stops its workers by itself once the stage's end of its pipe closes."""
    write_params(tmp_path, seed=7)
    (tmp_path / "compiled.py").write_text(STAGE_THAT_COMPILED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    proc = subprocess.run([sys.executable, "compiled.py"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "running.txt").read_text() == "False"  # so torch's shutdown returns without waiting
    assert "the process's shutdown took" in proc.stderr
    deadline = time.monotonic() + 60
    pids = [int(pid) for pid in (tmp_path / "pids.txt").read_text().split()]
    while not all(ended(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(ended(pid) for pid in pids), "the compile workers outlived their stage"


def test_steps_are_compiled_ahead_only_where_the_stages_compile_in_one_process():
    """`runtime.compile_ahead: auto`: on the CPU the stages do not compile (compile auto), so
    pretraining starts nothing; with compiling on, it starts lora, dpo, grpo and eval; not when switched
    off, nor for several processes (DDP's graphs are not one process's, and each rank would start
    its own), whether the params ask for them or torchrun started the stage."""
    from stages.compile_ahead import STAGES, stages_ahead
    from tinyllm.config import parse_params
    from tinyllm.train.distributed import Dist

    def ahead(dist=None, **sections):
        return stages_ahead(parse_params({"runtime": {"device": "cpu"}, **sections}), dist or Dist())

    compiling = {"device": "cpu", "compile": True}
    assert ahead() == []
    assert ahead(runtime=compiling) == list(STAGES) == ["lora", "dpo", "grpo", "eval"]
    assert ahead(runtime={**compiling, "compile_ahead": False}) == []
    assert ahead(runtime=compiling, distributed={"nproc": 2}) == []
    assert ahead(Dist(rank=0, world_size=2), runtime=compiling) == []


def test_a_step_that_cannot_be_compiled_ahead_is_logged_and_pretraining_goes_on(tmp_path, monkeypatch, caplog):
    """One that fails (here: no tokenizer yet) is logged with the end of its output; the block ran."""
    import logging

    from stages.compile_ahead import compile_ahead
    from tinyllm.config import parse_params
    from tinyllm.train.distributed import Dist

    write_params(tmp_path, runtime={"device": "cpu", "compile": True})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    caplog.set_level(logging.INFO, logger="stages.compile_ahead")
    ran = False
    with compile_ahead(parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text())), Dist()) as stages:
        assert list(stages) == ["lora", "dpo", "grpo", "eval"]
        ran = True
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert ran and len(failures) == 4 and all("artifacts/tokenizer" in message for message in failures), failures


def test_pretraining_waits_for_the_process_compiling_its_step_ahead_and_no_longer(tmp_path, monkeypatch):
    """tinyllm/pretrain_ahead.py: `wait` returns once the process in the pid file has ended, a zombie
    counting as ended (an orphan's reaper may be slow), and removes the file; it does not wait for a
    pid that is gone or another program's, nor past WAIT_SECONDS from the file's writing (it stops
    the process then), nor for one compiling for other params (stopped at once: an earlier run's).
    One for these params that ended before counts, and its digest goes. The process removes its own
    pid file."""
    import hashlib
    import signal
    import time

    from tinyllm import pretrain_ahead

    write_params(tmp_path, seed=1)
    monkeypatch.chdir(tmp_path)
    assert pretrain_ahead.wait() == 0.0  # none was started
    pid_file, digest = tmp_path / pretrain_ahead.FOLDER / "pid", tmp_path / pretrain_ahead.FOLDER / "params"
    pid_file.parent.mkdir(parents=True)

    def stand_in(seconds, named=True):  # a process that runs as long as the compile would
        code = f"import time; time.sleep({seconds})" + ("  # stages.compile_ahead" if named else "")
        return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)

    def started(pid, params=None):  # as `start` leaves it, for these params or others
        digest.write_text(hashlib.sha256(params or Path("params.yaml").read_bytes()).hexdigest())
        pid_file.write_text(str(pid))

    sleeper = stand_in(1.5)
    started(sleeper.pid)
    assert 1.2 < pretrain_ahead.wait() < 10 and not pid_file.exists()  # until it ended; unreaped, a zombie
    assert not digest.exists()
    sleeper.wait()
    started(sleeper.pid)
    assert pretrain_ahead.wait() < 0.5 and not pid_file.exists()  # gone
    other = stand_in(60, named=False)  # a stale file's pid, now another program's: neither waited for nor stopped
    started(other.pid)
    assert pretrain_ahead.wait() < 0.5 and other.poll() is None
    other.kill()
    other.wait()
    sleeper = stand_in(60)
    started(sleeper.pid)
    written = time.time() - pretrain_ahead.WAIT_SECONDS - 1
    os.utime(pid_file, (written, written))
    assert pretrain_ahead.wait() < 0.5 and not pid_file.exists()  # started too long ago:
    assert sleeper.wait(timeout=10) == -signal.SIGKILL  # stopped, not left to compete with pretraining
    sleeper = stand_in(60)
    started(sleeper.pid, params=b"seed: 2\n")  # an earlier run's, for other params, still compiling
    assert pretrain_ahead.wait() == 0.0 and not pid_file.exists() and not digest.exists()
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    started(12345678)  # for these params, compiled and ended before pretraining (its pid file gone)
    pid_file.unlink()
    (tmp_path / pretrain_ahead.FOLDER / "log").write_text("... first step done 30.2 s after the process started")
    assert pretrain_ahead.wait() < 0.5 and not digest.exists()  # counted, and removed: the next run starts anew
    pid_file.write_text("1")
    pretrain_ahead.finished()
    assert pid_file.exists()  # another process's file
    pid_file.write_text(str(os.getpid()))
    pretrain_ahead.finished()
    assert not pid_file.exists()


def test_each_data_stage_starts_pretrainings_compile_ahead_unless_one_for_these_params_runs_or_compiled(
        tmp_path, monkeypatch):
    """prepare and train_tokenizer both call `pretrain_ahead.start`: the second keeps the process the
    first started for the same params.yaml, running or done compiling, and replaces one started for
    other params (stopped: its graphs are not this run's)."""
    import hashlib
    import signal

    from tinyllm import pretrain_ahead

    write_params(tmp_path, runtime={"device": "cpu", "compile": False})  # the real process ends at once
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pid_file, log = pretrain_ahead.FOLDER / "pid", pretrain_ahead.FOLDER / "log"
    pretrain_ahead.start()
    first = int(pid_file.read_text())
    deadline = time.monotonic() + 120
    while pid_file.exists() and time.monotonic() < deadline:  # the process removes it as it ends
        time.sleep(0.1)
    assert "its step is not compiled ahead with these params" in log.read_text()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # stages.compile_ahead"],
                                start_new_session=True)
    try:
        pid_file.write_text(str(stand_in.pid))  # one for these params, still compiling
        pretrain_ahead.start()
        assert pid_file.read_text() == str(stand_in.pid) and stand_in.poll() is None  # kept
        write_params(tmp_path, runtime={"device": "cpu", "compile": False}, seed=7)  # another run's params
        pretrain_ahead.start()
        assert stand_in.wait(timeout=10) == -signal.SIGKILL  # stopped
        assert int(pid_file.read_text()) not in (stand_in.pid, first)  # and a new one started
    finally:
        stand_in.kill()
        pretrain_ahead.stop()  # as pretraining does once it has waited: the digest goes too
    assert not (pretrain_ahead.FOLDER / "params").exists()
    (pretrain_ahead.FOLDER / "params").write_text(hashlib.sha256(Path("params.yaml").read_bytes()).hexdigest())
    log.write_text("... first step done 31.0 s after the process started ...")  # one that compiled, ended
    pretrain_ahead.start()
    assert not pid_file.exists()  # kept: not started again


def test_when_pretraining_fails_the_processes_compiling_ahead_are_stopped_at_once(tmp_path, monkeypatch):
    """Killed, not waited for: a failing pretrain stage reports its error without delay."""
    import signal

    from stages.compile_ahead import compile_ahead
    from tinyllm.config import parse_params
    from tinyllm.train.distributed import Dist

    write_params(tmp_path, runtime={"device": "cpu", "compile": True})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    params = parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    with pytest.raises(KeyboardInterrupt), compile_ahead(params, Dist()) as processes:
        raise KeyboardInterrupt
    assert [p.returncode for p in processes.values()] == [-signal.SIGKILL] * 4
