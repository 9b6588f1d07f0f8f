"""End to end: the real `dvc repro` on a tiny config, in a temporary git repo.

The repo is committed before DVC runs: dvclive fails in a git repo with no commits.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"world": {"n_people": 24, "bios_per_person": 2, "n_arithmetic": 40}},
    "tokenizer": {"vocab_size": 320},
    "tokenize": {"val_fraction": 0.1},
    "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 64, "max_seq_len": 32},
    "pretrain": {"max_steps": 30, "batch_size": 4, "warmup_steps": 5, "log_interval": 5, "eval_interval": 15,
                 "eval_batches": 2},
    "sft": {"max_steps": 20, "batch_size": 4, "warmup_steps": 2, "log_interval": 5},
    "lora": {"max_steps": 10, "batch_size": 4, "warmup_steps": 2, "log_interval": 5},
    "dpo": {"max_steps": 10, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "log_interval": 5},
    "grpo": {"max_steps": 4, "batch_size": 4, "group_size": 4, "max_new_tokens": 6, "warmup_steps": 1,
             "log_interval": 2},
    "eval": {"max_fact_prompts": 12, "max_chat_prompts": 40, "max_new_tokens": 6},
}
EMPTY_WARNING = re.compile(r"WARNING: '[^']*' is empty")
"""What DVC prints for an empty dep or out."""
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def environment(env: dict | None = None) -> dict:
    """This process's environment with a git identity, this Python's scripts first on PATH, and `env`."""
    return {**os.environ, **GIT_ID, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            **(env or {})}


def sh(repo: Path, *cmd: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=environment(env), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def dvc(repo: Path, *args: str, env: dict | None = None) -> str:
    return sh(repo, sys.executable, "-m", "dvc", *args, env=env)


def back_to_the_committed_run(repo: Path) -> None:
    """The workspace as the last commit's params made it, whichever experiment ran since."""
    sh(repo, "git", "checkout", "params.yaml", "dvc.lock")
    dvc(repo, "checkout")


PARAMS_TRACER = """
# Loaded by every Python process of the first repro (PYTHONPATH). In a stage process
# (`python -m stages.X`) it records which params the stage reads after loading them (leaf names,
# like sft.lr), and writes them to $TINYLLM_TRACE_PARAMS/X.json at exit, with X.torch beside it
# where the process had loaded torch by then.
import atexit, dataclasses, json, os, sys
argv = getattr(sys, "orig_argv", [])
if os.environ.get("TINYLLM_TRACE_PARAMS") and "-m" in argv and argv[argv.index("-m") + 1].startswith("stages."):
    stage = argv[argv.index("-m") + 1].split(".", 1)[1]
    sys.path.insert(0, os.getcwd())  # the repo's own tinyllm, as `python -m` would find it
    from tinyllm import config
    paths, read = {}, set()

    def watch(obj, prefix):
        paths[id(obj)] = prefix
        cls = type(obj)
        if "_traced" not in cls.__dict__:
            names = {f.name for f in dataclasses.fields(cls)}

            def getattribute(self, name, names=names):
                value = object.__getattribute__(self, name)
                prefix = paths.get(id(self))
                if prefix is not None and name in names and not dataclasses.is_dataclass(value):
                    read.add(prefix + name)
                return value

            cls.__getattribute__, cls._traced = getattribute, True
        for f in dataclasses.fields(obj):
            value = object.__getattribute__(obj, f.name)
            if dataclasses.is_dataclass(value):
                watch(value, f"{prefix}{f.name}.")

    parse = config.parse_params

    def traced_parse(raw, source="params"):
        params = parse(raw, source)
        watch(params, "")
        return params

    config.parse_params = traced_parse

    def write():
        out = os.path.join(os.environ["TINYLLM_TRACE_PARAMS"], stage + ".json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        before = set(json.load(open(out))) if os.path.exists(out) else set()
        json.dump(sorted(before | read), open(out, "w"))
        if "torch" in sys.modules:
            open(out[:-len(".json")] + ".torch", "w").close()

    atexit.register(write)
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the project (what git would commit) with tiny params, committed, then reproduced."""
    repo = tmp_path_factory.mktemp("tinyllm")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(("reports/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    tracer = tmp_path_factory.mktemp("tracer")
    (tracer / "sitecustomize.py").write_text(PARAMS_TRACER)
    env = {"PYTHONPATH": str(tracer), "TINYLLM_TRACE_PARAMS": str(repo / "params_read")}
    repo.joinpath("first_repro.log").write_text(dvc(repo, "repro", env=env))
    sh(repo, "git", "add", "dvc.lock")  # the run that back_to_the_committed_run returns to, in any test order
    sh(repo, "git", "commit", "-qm", "first repro")
    return repo


@pytest.mark.slow
def test_repro_writes_every_output_with_sensible_metrics(repo):
    for path in ("artifacts/data/pretrain.jsonl", "artifacts/tokenizer/tokenizer.json", "artifacts/tokens/index.json",
                 "artifacts/pretrain/model.safetensors", "artifacts/pretrain/tokenizer.json",
                 "artifacts/sft/model.safetensors", "reports/live/sft/plots/metrics/train/loss.tsv",
                 "artifacts/lora/model.safetensors", "artifacts/lora/adapter/adapter_config.json",
                 "artifacts/lora/adapter/adapter_model.safetensors", "artifacts/dpo/model.safetensors",
                 "artifacts/grpo/model.safetensors", "artifacts/data/grpo.jsonl",
                 "artifacts/data/eval/eval_arith.jsonl",
                 "reports/eval/report.md", "reports/eval/loss.png", "artifacts/hf/config.json",
                 "artifacts/hf/model.safetensors", "artifacts/hf/generation_config.json"):
        assert (repo / path).is_file(), path
    for name in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin"):
        assert (repo / f"reports/live/dpo/plots/metrics/train/{name}.tsv").is_file(), name
    dpo = json.loads((repo / "reports/metrics/dpo.json").read_text())
    assert math.isfinite(dpo["train/loss"]) and dpo["pairs"] > 0 and dpo["reference_seconds"] >= 0
    assert json.loads((repo / "artifacts/dpo/config.json").read_text())["stage"] == "dpo"
    for name in ("reward", "zero_variance", "reply_length", "kl", "clip_fraction", "rollout_tokens_per_sec"):
        assert (repo / f"reports/live/grpo/plots/metrics/train/{name}.tsv").is_file(), name
    grpo = json.loads((repo / "reports/metrics/grpo.json").read_text())
    assert grpo["enabled"] and 0 <= grpo["train/reward"] <= 1 and grpo["rollout_rounds"] == 2
    assert json.loads((repo / "artifacts/grpo/config.json").read_text())["stage"] == "grpo"
    metrics = json.loads((repo / "reports/eval/metrics.json").read_text())
    assert math.isfinite(metrics["pretrain"]["val_ppl"]) and 1 < metrics["pretrain"]["val_ppl"] < 320
    assert list(metrics) == ["pretrain", "sft", "lora", "dpo", "grpo"]
    for name in ("sft", "lora", "dpo", "grpo"):
        assert 0 <= metrics[name]["arith_heldout"] <= 1 and 0 <= metrics[name]["arith_pass8"] <= 1, name
    assert "arith_heldout" not in metrics["pretrain"]  # a chat-form metric
    for stage in metrics.values():
        for key in ("facts", "qa_seen", "qa_heldout", "multi_turn", "identity", "preference", "chosen_style",
                    "bench_example", "bench_world"):
            assert 0 <= stage[key] <= 1, key
        assert stage["heldout_loss"] > 0 and math.isfinite(stage["pref_margin"])
    assert metrics["sft"]["pref_margin"] == 0  # the reference itself
    assert set(metrics["sft"]["bench_detail"]["world"]["subjects"]) == {"seen", "heldout"}
    assert metrics["pretrain"]["facts_detail"]["n_prompts"] == 12
    report = (repo / "reports/eval/report.md").read_text()
    assert "| QA, held-out people |" in report and "| benchmark world (" in report
    assert "## Replies to eval.prompts (greedy)" in report and "| 你是谁？ |" in report
    facts_table = report.split("## Fact completion", 1)[1].split("\n\n")[1]  # replies may hold newlines and pipes
    assert all(re.fullmatch(r"\|( (\\\||[^|])* \|){4}", row) for row in facts_table.splitlines()[2:]), facts_table
    pretrain = json.loads((repo / "reports/metrics/pretrain.json").read_text())
    assert pretrain["val/loss"] == pretrain["val/best_loss"] <= pretrain["val/last_loss"] and pretrain["kept_step"] > 0
    log = (repo / "first_repro.log").read_text()
    assert not EMPTY_WARNING.search(log)
    scored = re.search(r"scored artifacts/sft in [\d.]+ s in its parts \((.*)\)", log)  # eval's time by part
    assert scored and {"load", "val perplexity", "qa", "arith", "benchmark world"} <= {
        part.rsplit(" ", 1)[0] for part in scored[1].split(", ")}, scored
    # each training stage's end, for its exit and DVC's commit after it (reports/gpu_speed.md)
    training = ("pretrain", "sft", "lora", "dpo", "grpo")
    assert all(re.search(rf"{s}: done [\d.]+ s after the process started", log) for s in training), training
    card = (repo / "artifacts/hf/README.md").read_text()
    assert "## Evaluation" in card and "| qa_heldout |" in card  # the exported model's card carries its metrics
    tokens = json.loads((repo / "reports/metrics/tokens.json").read_text())
    assert tokens["train"]["n_tokens"] > tokens["val"]["n_tokens"] > 0
    loss_rows = (repo / "reports/live/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()
    first, last = float(loss_rows[1].split("\t")[-1]), float(loss_rows[-1].split("\t")[-1])
    assert len(loss_rows) == 1 + 30 // 5 and last < first  # the model learned something
    steps_taken = int(loss_rows[-1].split("\t")[0])  # all 30 here; test_best_weights.py stops one early
    assert pretrain["tokens_seen"] == steps_taken * TINY["pretrain"]["batch_size"] * TINY["model"]["max_seq_len"]
    assert (repo / "reports/live/pretrain/plots/metrics/val/loss.tsv").is_file()


@pytest.mark.slow
def test_the_pipeline_model_runs_in_llama_cpp_as_in_our_engine(repo):
    """(Before the experiments below change the workspace.) The export stage's f16 GGUF of the trained
    model, in real llama.cpp: greedy continuations of plain and chat-templated prompts as our
    engine's (up to f16 near-ties). (The chat handler and the stop at <|im_end|> are checked in
    test_gguf.py.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    from conftest import llama_cpp_flip

    from tinyllm.data.tokenizer import load_tokenizer, render_chat
    from tinyllm.train.checkpoint import load_model

    model, tok = load_model(repo / "artifacts/grpo"), load_tokenizer(repo / "artifacts/grpo")
    theirs = llama_cpp.Llama(model_path=str(repo / "artifacts/gguf/tinyllm.gguf"), n_ctx=32, verbose=False, seed=0)
    assert (repo / "artifacts/gguf/Modelfile").read_text().startswith("FROM ./tinyllm.gguf")
    people = ["李明", "王芳", "张伟", "Li Ming", "Wang Fang"]
    prompts = [f"{p}住在" for p in people] + [f"{p}的宠物是" for p in people] + [
        render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in [f"{p}住在哪里？" for p in people] + [f"{p}养了什么？" for p in people]]
    flips = []
    for prompt in prompts:
        ids = tok.encode(prompt).ids[-24:]  # room for 8 new tokens in the 32-token context
        if flip := llama_cpp_flip(theirs, model, ids, 32 - len(ids)):
            flips.append((prompt, *flip))
    assert len(flips) <= 2 and all(gap < 0.05 for *_, gap in flips), flips


def test_every_stage_lists_the_params_it_reads(repo):
    """What each stage read while it ran (recorded by PARAMS_TRACER) is among its params in dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        script = stage["cmd"].split()[-1].split(".", 1)[1]
        read = json.loads((repo / "params_read" / f"{script}.json").read_text())
        listed = [p for p in stage.get("params", []) if isinstance(p, str)]
        problems += [f"{name}: {key}" for key in read
                     if not any(key == p or key.startswith(p + ".") for p in listed)]
    assert not problems, "dvc.yaml params miss what the stage reads:\n  " + "\n  ".join(problems)
    assert "pretrain.lr" in json.loads((repo / "params_read/pretrain.json").read_text())  # the tracer saw reads


def test_the_data_stages_never_load_torch(repo):
    """Each stage is a process of its own, and torch's import took 2.3 s of one on the GPU machine;
    the data stages do no tensor work (recorded by PARAMS_TRACER at each stage's exit)."""
    loaded = {path.stem for path in (repo / "params_read").glob("*.torch")}
    assert not loaded & {"prepare", "train_tokenizer", "encode_chats", "tokenize_corpus"}, loaded
    assert {"pretrain", "sft", "eval", "export"} <= loaded  # the tracer saw torch where it is used


@pytest.mark.slow
def test_second_repro_does_nothing(repo):
    out = dvc(repo, "repro")
    assert "Running stage" not in out
    assert "up to date" in dvc(repo, "status")


@pytest.mark.slow
def test_changing_an_eval_param_reruns_only_eval(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["max_new_tokens"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    out = dvc(repo, "repro")
    assert "Running stage 'eval'" in out
    assert not any(f"Running stage '{s}'" in out
                   for s in ("prepare", "train_tokenizer", "tokenize", "pretrain", "sft", "lora", "dpo", "grpo"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "eval param")


@pytest.mark.slow
def test_exp_run_of_an_moe_on_two_processes_with_deepspeed(repo):
    """`dvc exp run -S distributed.nproc=2 -S model.moe.enabled=true`: every training stage relaunches
    itself under torchrun (here with DeepSpeed ZeRO-2), an MoE model goes through the whole pipeline,
    eval reads the consolidated checkpoints, and `dvc exp show` shows the run. (One run for both: each
    reruns every stage, 60 s of the suite's time apiece on a 2-core CPU.)"""
    try:
        out = dvc(repo, "exp", "run", "-S", "distributed.nproc=2", "-S", "distributed.strategy=deepspeed",
                  "-S", "model.dim=48", "-S", "model.n_layers=2", "-S", "model.moe.enabled=true",
                  "-S", "model.moe.n_routed_experts=4", "-S", "pretrain.max_steps=20")
        assert all(f"Running stage '{s}'" in out for s in ("pretrain", "sft", "lora", "dpo", "grpo", "eval"))
        assert "torch.distributed.run --standalone --nproc_per_node 2 -m stages.pretrain" in out
        pretrain = json.loads((repo / "reports/metrics/pretrain.json").read_text())
        assert pretrain["processes"] == 2 and pretrain["params_active"] < pretrain["params"]
        for stage in ("pretrain", "sft", "lora", "dpo", "grpo"):
            assert math.isfinite(json.loads((repo / f"reports/metrics/{stage}.json").read_text())["train/loss"]), stage
        assert not (repo / "checkpoints").exists() or not any((repo / "checkpoints").iterdir())
        name = re.search(r"Ran experiment\(s\): (\S+)", out)
        assert name, out[-2000:]
        shown = {run["name"]: run["revs"][0]["data"]  # each experiment as `dvc exp show` tabulates it
                 for row in json.loads(dvc(repo, "exp", "show", "--json")) for run in row["experiments"] or []}
        assert name[1] in shown, sorted(shown)
        run = shown[name[1]]
        params = run["params"]["params.yaml"]["data"]
        assert params["model"]["dim"] == 48 and params["model"]["moe"]["enabled"]
        assert params["distributed"]["nproc"] == 2 and params["distributed"]["strategy"] == "deepspeed"
        assert params["pretrain"]["max_steps"] == 20
        metrics = json.loads((repo / "reports/eval/metrics.json").read_text())  # the workspace holds the experiment
        shown_metrics = run["metrics"]["reports/eval/metrics.json"]["data"]
        assert shown_metrics["grpo"]["moe_max_load"] == metrics["grpo"]["moe_max_load"]
        assert list(metrics) == ["pretrain", "sft", "lora", "dpo", "grpo"]
        for stage in metrics.values():
            assert 1 <= stage["moe_max_load"] <= 4 and len(stage["moe_balance"]["load"]["layer1"]) == 4
        assert (repo / "reports/live/pretrain/plots/metrics/train/moe/layer1/expert3.tsv").is_file()
        assert (repo / "reports/live/pretrain/plots/metrics/train/balance_loss.tsv").is_file()
        assert "busiest expert" in (repo / "reports/eval/report.md").read_text()
    finally:  # later tests run on the single-process dense run, whatever failed here
        back_to_the_committed_run(repo)


@pytest.mark.slow
def test_chat_talks_to_the_newest_pipeline_model(repo):
    proc = subprocess.run([sys.executable, "-m", "tinyllm.cli", "chat", "--temperature", "0", "--max-tokens", "4"],
                          input="你是谁？\n/exit\n", cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "chatting with artifacts/grpo" in proc.stdout and "assistant> " in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tinyllm.cli", "chat", "--adapter", "artifacts/lora/adapter",
                           "--seed", "1"], input="你是谁？\n", cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "chatting with artifacts/sft + adapter artifacts/lora/adapter" in proc.stdout  # the base it was trained on
    proc = subprocess.run([sys.executable, "-m", "tinyllm.cli", "chat", "artifacts/dpo", "--adapter",
                           "artifacts/lora/adapter"], input="", cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "was trained on artifacts/sft, not artifacts/dpo" in proc.stderr


@pytest.mark.slow
def test_post_training_stages_run_under_torchrun(repo):
    import socket

    for stage in ("sft", "lora", "dpo", "grpo"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sh(repo, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", f"stages.{stage}")
        summary = json.loads((repo / f"reports/metrics/{stage}.json").read_text())
        assert math.isfinite(summary["train/loss"]), stage


@pytest.mark.slow
def test_turning_lora_off_runs_dpo_from_sft(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lora"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    out = dvc(repo, "repro")
    assert all(f"Running stage '{s}'" in out for s in ("lora", "dpo", "eval"))
    assert "Running stage 'sft'" not in out
    assert (repo / "artifacts/lora/DISABLED").is_file() and not (repo / "artifacts/lora/model.safetensors").exists()
    assert list(json.loads((repo / "reports/eval/metrics.json").read_text())) == ["pretrain", "sft", "dpo", "grpo"]


@pytest.mark.slow
def test_exp_run_on_the_example_corpora_through_params_alone(repo):
    """Every format of data/corpus/examples (broken lines included) through the whole pipeline,
    chosen with -S alone: MiniMind and Seq-Monkey text, MiniMind SFT, ShareGPT, Alpaca, deepctrl, MiniMind DPO,
    GSM8K-style prompts for grpo."""
    ex = "data/corpus/examples"
    out = dvc(repo, "exp", "run", "-S", "data.source=files",
              "-S", f"data.pretrain=[{ex}/minimind_pretrain.jsonl,{ex}/seq_monkey.jsonl]",
              "-S", f"data.sft=[{ex}/minimind_sft.jsonl,{ex}/sharegpt.jsonl,{ex}/alpaca.jsonl,{ex}/deepctrl_*.jsonl]",
              "-S", f"data.identity=[{ex}/minimind_lora_identity.jsonl]", "-S", f"data.dpo=[{ex}/minimind_dpo.jsonl]",
              "-S", f"data.grpo=[{ex}/gsm8k_style.jsonl]",
              "-S", "tokenizer.max_corpus_bytes=20000", "-S", "model.max_seq_len=128")
    assert "Running stage 'dpo'" in out and "Running stage 'eval'" in out
    assert not EMPTY_WARNING.search(out)  # nothing declared to DVC is empty by design
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    metrics = json.loads((repo / "reports/eval/metrics.json").read_text())
    assert {"pretrain", "sft", "dpo"} <= set(metrics)  # (lora too, unless an earlier test turned it off)
    assert 0 <= metrics["grpo"]["arith_heldout"] <= 1  # RL on the user's GSM8K lines, scored on their held-out share
    for name, stage in metrics.items():  # the scoreboard on the user's own data, in every stage
        assert math.isfinite(stage["val_loss"]) and 0 <= stage["bench_example"] <= 1, name
        if name != "pretrain":
            assert math.isfinite(stage["heldout_loss"]) and 0 <= stage["preference"] <= 1, name
    assert "heldout_loss" in json.dumps(shown) and "bench_example" in json.dumps(shown)
    prepared = json.loads((repo / "reports/metrics/prepare.json").read_text())
    assert prepared["bad_lines_skipped"] == 19 and prepared["duplicates_removed"] > 0
    assert prepared["sft_single"] > 0 and prepared["sft_multi"] > 0 and prepared["dpo"] + prepared["eval_dpo"] == 20
    assert prepared["heldout_single"] > 0 and prepared["heldout_multi"] > 0
    assert re.search(r"training the tokenizer on one document in every [2-9] ", out)  # max_corpus_bytes sampled
    dpo = json.loads((repo / "reports/metrics/dpo.json").read_text())
    assert math.isfinite(dpo["train/loss"])


COMPILED_AHEAD = ("pretrain", "lora", "dpo", "grpo")


@pytest.fixture(scope="module")
def compiled_ahead(repo, tmp_path_factory) -> dict[str, tuple[Path, dict, Path, list]]:
    """For each stage of COMPILED_AHEAD, a work folder holding the repo's artifacts but the stage's own
    output, with the step compiled ahead into an empty compile cache of its own, as the pipeline does
    it: the four `stages.compile_ahead` processes at once, beside each other; pretrain's started as
    the data stages start it (`tinyllm.pretrain_ahead.start`) and waited for as the
    pretrain stage waits. By stage: (the folder, its environment, the process's log file, the
    folder's files before it ran)."""
    # from the committed tiny run, not an earlier test's experiment (after the example corpora's run,
    # its longer rows made these tests take twice as long: 193 s, now 90 s)
    back_to_the_committed_run(repo)
    ahead, processes = {}, {}
    for stage in COMPILED_AHEAD:
        work = tmp_path_factory.mktemp(f"ahead-{stage}")
        (work / "artifacts").mkdir()
        for folder in (repo / "artifacts").iterdir():  # the stage's inputs; its own output stays here
            if folder.name != stage:
                (work / "artifacts" / folder.name).symlink_to(folder)
        (work / "stages").symlink_to(repo / "stages")
        # as the artifacts were made, compiling, and lora on for its own stage, off for the others (dpo
        # then starts from sft, whatever artifacts/lora holds); one step, as the graphs compared are the
        # first step's (two for dpo, which fails a run that leaves the policy where it started, as its
        # first step does)
        params = merge(yaml.safe_load((repo / "params.yaml").read_text()),
                       {"runtime": {"compile": True}, "lora": {"enabled": stage == "lora"}})
        params[stage].update(max_steps=2 if stage == "dpo" else 1, warmup_steps=0)
        (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
        env = {"TORCHINDUCTOR_CACHE_DIR": str(work.parent / f"{work.name}-compile-cache")}
        before = sorted(work.rglob("*"))
        if stage == "pretrain":  # its log in the project's checkpoints/, the process in a session of its own
            sh(work, sys.executable, "-c", "from tinyllm import pretrain_ahead; pretrain_ahead.start()", env=env)
            ahead[stage] = (work, env, work / "checkpoints/pretrain_ahead/log", before)
            continue
        log = work.parent / f"{work.name}.log"
        with log.open("w") as output:
            process = subprocess.Popen([sys.executable, "-m", "stages.compile_ahead", stage], cwd=work,
                                       env=environment(env), stdout=output, stderr=subprocess.STDOUT)
        ahead[stage], processes[stage] = (work, env, log, before), process
    pid_file = ahead["pretrain"][0] / "checkpoints/pretrain_ahead/pid"
    pretrain_pid = int(pid_file.read_text())
    try:
        for stage, process in processes.items():
            process.wait(timeout=600)
            assert process.returncode == 0, f"compile_ahead {stage} failed:\n{ahead[stage][2].read_text()[-3000:]}"
        deadline = time.monotonic() + 600
        while pid_file.exists() and time.monotonic() < deadline:  # the process removes it as it ends
            time.sleep(0.2)
        assert not pid_file.exists(), "compile_ahead pretrain did not end in time"
    finally:  # none left running after a failure
        for process in processes.values():
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pretrain_pid, signal.SIGKILL)
    work = ahead["pretrain"][0]
    # the stage itself without the later stages' processes, which would compile beside it on 2 cores
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(merge(params, {"runtime": {"compile_ahead": False}}),
                                                     allow_unicode=True, sort_keys=False))
    return ahead


@pytest.mark.slow
@pytest.mark.parametrize("stage", COMPILED_AHEAD)
def test_a_step_compiled_ahead_from_random_weights_is_the_one_its_stage_compiles(compiled_ahead, stage):
    """`runtime.compile_ahead` (stages/compile_ahead.py): a stage's step, compiled ahead from random
    weights into an empty compile cache, is what the stage then compiles from its real starting
    model: every graph of its first step comes from the cache (compiling forced on, as on a GPU)."""
    work, env, log, before = compiled_ahead[stage]
    assert "graphs from the compile cache: 0 of" in log.read_text()  # it compiled, cold
    if stage == "pretrain":
        folder = work / "checkpoints/pretrain_ahead"
        before = sorted([*before, work / "checkpoints", folder, folder / "params", log])
    assert sorted(work.rglob("*")) == before  # and wrote nothing in the project (but pretrain's log and params)
    sh(work, sys.executable, "-m", f"stages.{stage}", env=env)
    metrics = json.loads((work / f"reports/metrics/{stage}.json").read_text())
    assert metrics["compile_cache_misses"] == 0 and metrics["compile_cache_hits"] > 0, metrics
