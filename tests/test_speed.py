"""What the GPU speed work rests on, checked on the CPU: every stage's throughput counts all
positions with padding apart, start-up apart from the steady state; and packed DPO batches of
changing row counts compile once."""

from pathlib import Path

import pytest
import torch

from tinyllm.bench import bench_train
from tinyllm.config import DPOConfig, LoRAConfig, ModelConfig, MoEConfig, RuntimeConfig, SFTConfig, parse_params
from tinyllm.data.chat import ChatBatches, encode_conversation
from tinyllm.data.labels import IGNORE_INDEX
from tinyllm.data.preference import PreferenceBatches, encode_pairs
from tinyllm.data.tokenizer import ENDOFTEXT
from tinyllm.errors import ConfigError
from tinyllm.model.transformer import Transformer
from tinyllm.train.dpo import pair_logprobs
from tinyllm.train.loop import fit
from tinyllm.train.lora import add_lora
from tinyllm.train.objectives import DPOLoss, NextTokenLoss
from tinyllm.train.runtime import (
    INDUCTOR_OPTIONS,
    compile_options,
    compile_seconds,
    compile_timers,
    compiled_graphs,
    compiles,
    replays_cuda_graphs,
)

CPU = RuntimeConfig(device="cpu")


def test_compile_auto_means_on_a_gpu_only():
    assert compiles(RuntimeConfig(compile="auto"), torch.device("cuda")) is True
    assert compiles(RuntimeConfig(compile="auto"), torch.device("cpu")) is False
    assert compiles(RuntimeConfig(compile=True), torch.device("cpu")) is True
    assert parse_params({"runtime": {"compile": "auto"}}).runtime.compile == "auto"
    with pytest.raises(ConfigError, match="runtime.compile='yes' must be auto, true, false or max-autotune"):
        parse_params({"runtime": {"compile": "yes"}})
    with pytest.raises(ConfigError, match="runtime.compile='reduce-overhead' must be"):  # graphs: runtime.cuda_graphs
        parse_params({"runtime": {"compile": "reduce-overhead"}})
    mode = RuntimeConfig(compile="max-autotune-no-cudagraphs")
    assert compiles(mode, torch.device("cpu"))
    assert compile_options(mode)["options"]["max_autotune"] is True
    assert compile_options(RuntimeConfig(compile=True)) == {"options": INDUCTOR_OPTIONS}
    with pytest.raises(ConfigError, match="runtime.compile='reduce-overhead'"):  # a RuntimeConfig built in code
        compile_options(RuntimeConfig(compile="reduce-overhead"))


def test_cuda_graphs_replay_only_a_single_gpu_step_of_one_shape():
    """`runtime.cuda_graphs: auto` asks torch.compile for graphs only where a replay is the same step:
    one GPU, compiled, one batch shape, a dense model, no gradient accumulation; and never against a
    compile mode that says no to them."""
    gpu, auto = torch.device("cuda"), RuntimeConfig(compile="auto")
    where = dict(processes=1, grad_accum=1, fixed_shapes=True, moe=False)
    assert replays_cuda_graphs(auto, gpu, **where)
    assert compile_options(auto, cuda_graphs=True)["options"]["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in compile_options(auto)["options"]
    for change in ({"processes": 2}, {"grad_accum": 2}, {"fixed_shapes": False}, {"moe": True}):
        assert not replays_cuda_graphs(auto, gpu, **{**where, **change}), change
    assert not replays_cuda_graphs(auto, torch.device("cpu"), **where)
    assert not replays_cuda_graphs(RuntimeConfig(compile=False), gpu, **where)
    assert not replays_cuda_graphs(RuntimeConfig(cuda_graphs=False), gpu, **where)
    assert not replays_cuda_graphs(RuntimeConfig(compile="max-autotune-no-cudagraphs"), gpu, **where)


def test_fit_tells_the_engine_the_batch_shapes_and_whether_the_model_is_an_moe(monkeypatch, tokenizer):
    """What `replays_cuda_graphs` is asked from inside `fit`: the caller's fixed_shapes, the MoE flag
    read through a peft wrapper too, one process; on the CPU no step replays (cuda_graphs 0)."""
    from tinyllm.train import engine

    asked, real = [], engine.replays_cuda_graphs
    monkeypatch.setattr(engine, "replays_cuda_graphs", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    vocab = tokenizer.get_vocab_size()

    def one_step(model, fixed_shapes):
        ids = torch.randint(0, vocab, (2, 17))
        return fit(model, NextTokenLoss(), iter([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]),
                   SFTConfig(max_steps=1, batch_size=2, warmup_steps=0, log_interval=1), CPU, fixed_shapes=fixed_shapes)

    dense = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32, vocab_size=vocab)
    result = one_step(Transformer(ModelConfig(**dense)), True)
    one_step(add_lora(Transformer(ModelConfig(**dense)), LoRAConfig()), False)
    one_step(Transformer(ModelConfig(**dense, moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2,
                                                            first_dense_layers=0))), True)
    assert [(kw["fixed_shapes"], kw["moe"], kw["processes"]) for kw in asked] == [(True, False, 1), (False, False, 1),
                                                                                (True, True, 1)]
    assert result.final["cuda_graphs"] == 0


def test_a_compile_mode_reaches_torch_compile_and_trains_as_the_eager_model_does(monkeypatch):
    """`runtime.compile: max-autotune-no-cudagraphs`: torch.compile gets the mode's options, compiles a graph
    and trains to the eager run's losses."""
    settings = dict(seq_len=32, batch_size=2, vocab_size=300, steps=10, warmup=10, device="cpu", dtype="float32")
    eager = bench_train("tiny", compile=False, **settings)
    modes, real_compile = [], torch.compile

    def recording_compile(model, **kwargs):
        modes.append(kwargs["options"].get("max_autotune"))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    graphs = compiled_graphs()
    tuned = bench_train("tiny", compile="max-autotune-no-cudagraphs", **settings)
    assert modes == [True] and compiled_graphs() > graphs
    assert [loss for _, loss in tuned["loss_curve"]] == pytest.approx([loss for _, loss in eager["loss_curve"]],
                                                                      abs=1e-3)


def _chat(tokenizer, n=40):
    return [encode_conversation(tokenizer, [{"role": "user", "content": f"李明住在哪里？{i}"},
                                            {"role": "assistant", "content": "李明住在杭州。"}]) for i in range(n)]


def test_throughput_counts_every_position_and_the_padding_apart(tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64,
                                    vocab_size=tokenizer.get_vocab_size()))
    batches = ChatBatches(_chat(tokenizer), batch_size=4, seq_len=64, seed=0, pad_id=tokenizer.token_to_id(ENDOFTEXT))
    batch = next(iter(batches))
    padded = int(batch["padding"].sum())
    assert 0 < padded < batch["padding"].numel()
    assert (batch["labels"][batch["padding"]] == IGNORE_INDEX).all()  # padding is never a target
    result = fit(model, NextTokenLoss(), batches, SFTConfig(max_steps=12, batch_size=4, log_interval=4), CPU)
    assert [h["step"] for h in result.history] == [4, 8, 12]
    assert all(0 < h["padding_share"] < 1 and h["tokens_per_sec"] > 0 for h in result.history)
    assert all(h["recompiles"] == 0 for h in result.history)
    final = result.final
    assert final["recompiles"] == 0 and 0 < final["padding_share"] < 1
    # the steady state is windows 2 and 3 only: between their two rates
    rates = [h["tokens_per_sec"] for h in result.history[1:]]
    assert min(rates) * 0.999 <= final["tokens_per_sec"] <= max(rates) * 1.001
    assert final["startup_seconds"] >= final["first_step_seconds"] > 0
    # the stage's own setup (here: this test process until fit), the device, the resume check and
    # the engine come before the first step, each measured apart, and they add up to the start-up
    parts = ("setup_seconds", "device_seconds", "resume_seconds", "engine_seconds", "first_step_seconds")
    assert all(final[p] > 0 for p in parts)
    assert 0.99 * final["startup_seconds"] <= sum(final[p] for p in parts) <= final["startup_seconds"]
    assert "compile_seconds" not in final  # eager: nothing compiled, whatever earlier tests compiled


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_seconds_splits_a_compile_into_parts_that_add_up(dynamic):
    """With static shapes the backward compiles at its first run, after the forward's compile; with
    a dynamic dim, inside it. Either way the parts (tracing, forward, backward) add up to the whole,
    each second counted once, and nothing compiled means no split. Caches off: a cached graph loads
    its backward with the forward."""
    assert compile_seconds(since=compile_timers()) == {}
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    x = torch.randn(4, 16)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        before = compile_timers()
        out = torch.compile(model)(x).sum()
        forward_only = compile_seconds(since=before)
        out.backward()
        whole = compile_seconds(since=before)
    assert (forward_only["backward"] > 0) == dynamic
    assert whole["backward"] > 0 and all(seconds >= 0 for seconds in whole.values())
    assert whole["compile"] > forward_only["compile"] if not dynamic else whole == forward_only
    assert whole["tracing"] + whole["forward"] + whole["backward"] == pytest.approx(whole["compile"])


def test_packed_dpo_batches_of_changing_row_counts_compile_once(tokenizer):
    """Under torch.compile (inductor, on the CPU here) the DPO step sees batches of different row
    counts (packing depends on the lengths drawn); marked dynamic, they never recompile."""
    torch._dynamo.reset()  # no compiled code or shape history from earlier tests in this process
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=128,
                                    vocab_size=tokenizer.get_vocab_size()))
    pad = tokenizer.token_to_id(ENDOFTEXT)
    question = {"role": "user", "content": "他养了什么？"}
    pairs = encode_pairs(tokenizer, [  # replies of very different lengths, so the packed row counts differ
        {"chosen": [question, {"role": "assistant", "content": "李明的宠物是猫。" * (1 + i % 6)}],
         "rejected": [question, {"role": "assistant", "content": "我不知道。"}]} for i in range(24)])
    ref = pair_logprobs(model, pairs, 127, pad, torch.device("cpu"), torch.float32)
    batches = PreferenceBatches(pairs, ref, batch_size=4, seq_len=127, seed=0, pad_id=pad)
    rows = set()
    for _, batch in zip(range(12), batches):
        rows.add(batch["input_ids"].shape[0])
    assert len(rows) > 1
    cfg = DPOConfig(max_steps=12, batch_size=4, lr=1e-3, warmup_steps=1, log_interval=1)  # warm-up: step 1
    # a fixed thread count: following the free cores changes torch's thread count, and Dynamo recompiles
    # on that (its guard "GLOBAL_STATE changed: num_threads", seen while a cold compile kept the cores busy)
    result = fit(model, DPOLoss(0.1), batches, cfg, RuntimeConfig(device="cpu", compile=True, threads=1))
    assert result.final["recompiles"] == 0 and result.final["padding_share"] > 0
    # most of the first step is compiling it (with the row count dynamic, forward and backward at once)
    first_step = result.final["first_step_seconds"]
    assert 0.5 * first_step < result.final["compile_seconds"] <= first_step


def test_a_recompile_in_the_first_log_window_counts(tokenizer):
    """The first step compiles; a batch of a new shape at step 2 recompiles, though its window (steps
    1-4) is the warm-up one for throughput. (Counted from the first window's end, it was not: GRPO's
    one recompile on an H100 went unreported that way.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64,
                                    vocab_size=tokenizer.get_vocab_size()))

    def batches(length: int):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (2, length + 1))
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    shapes = iter([batches(16)] + [batches(24)] * 7)  # not marked dynamic: step 2 compiles again
    cfg = SFTConfig(max_steps=8, batch_size=2, log_interval=4, warmup_steps=1)
    result = fit(model, NextTokenLoss(), shapes, cfg, RuntimeConfig(device="cpu", compile=True, threads=1))
    assert result.history[0]["recompiles"] >= 1 and result.final["recompiles"] == result.history[0]["recompiles"]


def test_the_gpu_preset_prints_flags_that_params_yaml_accepts(capsys):
    import yaml

    from tinyllm.cli import main
    from tinyllm.presets import PRESETS, preset_params

    main(["preset", "gpu"])
    flags = capsys.readouterr().out.split()
    assert flags[::2] == ["-S"] * len(PRESETS["gpu"])
    pairs = dict(flag.split("=", 1) for flag in flags[1::2])
    assert pairs["model.dim"] == "768" and pairs["sft.batch_size"] == "32"
    # every flag names a key params.yaml already has, and the merged params validate
    raw = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    merged = _merged(raw, preset_params("gpu"))
    for dotted in pairs:
        section = raw
        for part in dotted.split("."):
            assert part in section, f"{dotted} is not a key of params.yaml"
            section = section[part]
    params = parse_params(merged)
    assert params.model.dim == 768 and params.data.world.n_people == 3000 and params.dpo.max_steps == 20
    assert params.pretrain.lr < raw["pretrain"]["lr"]  # at the CPU default's rate 768×8 plateaued (presets.py)


def _merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def test_an_unknown_or_broken_preset_is_named(monkeypatch, capsys):
    from tinyllm import presets
    from tinyllm.cli import main

    with pytest.raises(SystemExit, match="unknown preset 'cpu' \\(known: gpu\\)"):
        main(["preset", "cpu"])
    monkeypatch.setitem(presets.PRESETS, "bad", {"sft.batch_size": 0})
    with pytest.raises(SystemExit, match="(?s)preset bad: .*sft.batch_size=0 must be > 0"):
        main(["preset", "bad"])


def test_a_packed_batch_refuses_pairs_that_do_not_split_over_the_processes(tokenizer):
    from tinyllm.data.preference import pack_pairs

    question = {"role": "user", "content": "你是谁？"}
    [pair] = encode_pairs(tokenizer, [{"chosen": [question, {"role": "assistant", "content": "小光"}],
                                   "rejected": [question, {"role": "assistant", "content": "不知"}]}])
    with pytest.raises(ValueError, match="3 pairs do not split evenly over 2 processes"):
        pack_pairs([pair] * 3, 63, 0, shares=2)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64,
                                    vocab_size=tokenizer.get_vocab_size()))
    batch = pack_pairs([pair] * 2, 63, 0)
    with pytest.raises(ValueError, match="segments .* without a cache and without key_valid"):
        model(batch["input_ids"], segments=batch["segments"], key_valid=batch["segments"] >= 0)


def test_start_up_counts_from_the_stage_start_across_a_relaunch(monkeypatch):
    import time

    from tinyllm.train.runtime import STARTED_AT, process_seconds

    assert 0 < process_seconds() < 3600  # this process's own start
    monkeypatch.setenv(STARTED_AT, str(time.time() - 100))  # set by the first process before torchrun
    assert 100 <= process_seconds() < 110


def test_a_process_is_never_older_than_the_time_since_it_was_spawned():
    """process_seconds in a fresh process is at most the time since its parent started it (plus the
    kernel's 10 ms tick): psutil's create_time, with the boot time in whole seconds, made it up to
    1 s more."""
    import subprocess
    import sys
    import time

    probe = "import time; from tinyllm.train.runtime import process_seconds; print(process_seconds(), time.time())"
    for _ in range(3):
        spawned = time.time()
        age, now = map(float, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                             check=True).stdout.split())
        assert 0 < age <= now - spawned + 0.02


WINDOW_PROBE = """
import os

import torch
from tinyllm.train.distributed import init_distributed, close_distributed
from tinyllm.train.loop import MetricsWindow

dist = init_distributed()
window = MetricsWindow(torch.device("cpu"), dist)
ids = torch.zeros(2, 10, dtype=torch.long)
padding = torch.zeros(2, 10, dtype=torch.bool)
padding[:, : 2 + 6 * dist.rank] = True  # rank 0: 4 padded positions of 20; rank 1: 16 of 20
window.add_micro_batch({"input_ids": ids, "padding": padding}, torch.tensor(1.0), {}, 1)
window.end_step(0, torch.tensor(1.0))
metrics = window.close(None)
# one write of the whole line: print writes its pieces apart, and the two ranks' pieces interleaved
os.write(1, f"rank {dist.rank} padding_share {metrics['padding_share']} tokens {window.steady}\\n".encode())
close_distributed()
"""


def test_padding_share_is_summed_over_the_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(WINDOW_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(script)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    shares = [line for line in out.stdout.splitlines() if "padding_share" in line]
    assert len(shares) == 2 and all("padding_share 0.5 " in line for line in shares)  # (4 + 16) / 40 on both ranks
