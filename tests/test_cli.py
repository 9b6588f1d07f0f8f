import gzip
import json

import pytest
from conftest import make_chat_checkpoint

from tinyllm.bench import trace_summary
from tinyllm.cli import build_parser, main


def test_bench_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--models", "--compile", "--seq-len", "--batch-size", "--steps", "--warmup", "--dtype", "--out"):
        assert flag in text
    assert "(default: 512)" in text


def test_unknown_preset_is_rejected_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--models", "huge"])
    assert "unknown model preset(s) ['huge']" in capsys.readouterr().err


def test_bench_train_runs_the_real_loop_and_writes_a_table(tmp_path, capsys):
    main(["bench", "train", "--models", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "5",
          "--warmup", "5", "--vocab-size", "300", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "tokens_per_sec" in printed
    data = json.loads((tmp_path / "train_cpu.json").read_text())
    row = data["rows"][0]
    assert row["tokens_per_sec"] > 0 and row["mfu"] is None and row["seq"] == 32
    assert (tmp_path / "train_cpu.md").read_text().startswith("# Training throughput — cpu")


def test_bench_train_profile_writes_a_trace_and_operator_tables(tmp_path, capsys):
    main(["bench", "train", "--models", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "40",
          "--warmup", "10", "--vocab-size", "300", "--device", "cpu", "--out", str(tmp_path),
          "--profile", str(tmp_path / "prof")])
    assert capsys.readouterr().out.count("profile tiny_ddp_1x_b2 rank 0") == 1  # one window, not one per 7 steps
    report = (tmp_path / "prof" / "tiny_ddp_1x_b2_rank0.txt").read_text()
    summary = json.loads(report.splitlines()[0])
    assert summary["steps"] == 5 and summary["wall_ms"] > 0 and summary["gpu_ops"] == 0  # CPU: no GPU kernels
    assert "aten::mm" in report or "aten::addmm" in report  # the operator table covers the model's matmuls
    with gzip.open(tmp_path / "prof" / "tiny_ddp_1x_b2_rank0.trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]


def test_trace_summary_counts_nccl_time_not_hidden_by_compute():
    """One step: compute kernels 0-10 and 12-20 µs, NCCL 8-14 (a gap at 10-12 leaves 2 µs exposed)."""
    kernel = lambda name, ts, dur: {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "ph": "X"}
    step = {"name": "ProfilerStep#3", "ph": "X", "ts": 0, "dur": 25_000}
    trace = {"traceEvents": [{**step, "cat": "user_annotation"}, {**step, "cat": "gpu_user_annotation"},
                             kernel("ampere_gemm", 0, 10_000), kernel("triton_red", 12_000, 8_000),
                             kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 8_000, 6_000)]}
    summary = trace_summary(trace)
    assert summary == {"steps": 1, "wall_ms": 25.0, "gpu_span_ms": 20.0, "gpu_busy_ms": 20.0, "compute_ms": 18.0,
                       "nccl_ms": 6.0, "nccl_exposed_ms": 2.0, "gpu_ops": 3}


def test_bench_train_with_deepspeed_in_one_process_matches_plain(tmp_path, capsys):
    """No launcher: the DeepSpeed engine makes its own process group of one; same losses as plain."""
    main(["bench", "train", "--models", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "10",
          "--warmup", "10", "--vocab-size", "300", "--device", "cpu", "--strategy", "ddp,zero2",
          "--out", str(tmp_path)])
    plain, zero2 = json.loads((tmp_path / "train_cpu.json").read_text())["rows"]
    assert (plain["strategy"], zero2["strategy"]) == ("ddp", "zero2") and plain["procs"] == 1
    assert abs(plain["final_loss"] - zero2["final_loss"]) < 1e-3


def test_bench_infer_times_prefill_and_decode(tmp_path, capsys):
    main(["bench", "infer", "--models", "tiny", "--batch-sizes", "1,4", "--prompt-len", "16", "--new-tokens", "8",
          "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "infer_cpu.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["ttft_ms"] > 0 and row["decode_tokens_per_sec_per_seq"] > 0
        assert row["decode_tokens_per_sec_total"] == pytest.approx(row["batch"] * row["decode_tokens_per_sec_per_seq"],
                                                                   rel=0.01)
    assert (tmp_path / "infer_cpu.md").read_text().startswith("# Generation speed — cpu")


def _chat(args, stdin, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "tinyllm.cli", "chat", *args], input=stdin, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)


def test_chat_streams_replies_resets_and_exits(tmp_path, tokenizer):
    ckpt = make_chat_checkpoint(tmp_path, tokenizer)
    proc = _chat([str(ckpt), "--temperature", "0", "--max-tokens", "5"],
                 "李明住在哪里？\n/reset\n你好\n/exit\n不会读到\n",
                 tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"chatting with {ckpt}" in proc.stdout
    assert proc.stdout.count("assistant> ") == 2 and "(conversation cleared)" in proc.stdout


def test_chat_without_a_checkpoint_uses_the_newest_stage_or_says_what_to_do(tmp_path, tokenizer):
    proc = _chat([], "", tmp_path)
    assert proc.returncode == 1 and "no chat checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = make_chat_checkpoint(tmp_path, tokenizer)
    (tmp_path / "artifacts").mkdir()
    ckpt.rename(tmp_path / "artifacts/sft")
    proc = _chat([], "/exit\n", tmp_path)
    assert proc.returncode == 0 and "chatting with artifacts/sft" in proc.stdout


def test_chat_rejects_bad_sampling_flags(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--top-p", "1.5"])
    assert "'1.5' must be in (0, 1]" in capsys.readouterr().err


def test_commands_name_bad_input_in_one_line(tmp_path, tokenizer, capsys):
    """A missing checkpoint for the serving bench, a metrics file that is not JSON: `error: …`, no traceback."""
    with pytest.raises(SystemExit, match=f"error: .*{tmp_path / 'nothing'}"):
        main(["bench", "serve", str(tmp_path / "nothing"), "--out", str(tmp_path / "bench")])
    ckpt = make_chat_checkpoint(tmp_path, tokenizer)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"error: --metrics .*metrics.json: not a JSON object"):
        main(["export", str(ckpt), str(tmp_path / "hf"), "--metrics", str(tmp_path / "metrics.json")])
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "stage": "sft"}))
    (tmp_path / "metrics.json").write_text('{"sft": 1}')  # the stage's entry is not a mapping
    with pytest.raises(SystemExit, match=r"error: --metrics .*holds int"):
        main(["export", str(ckpt), str(tmp_path / "hf"), "--metrics", str(tmp_path / "metrics.json")])


def test_served_names_end_at_the_first_equals_sign_and_paths_may_hold_one(tmp_path, tokenizer):
    from tinyllm.errors import UserError
    from tinyllm.serve.models import load_served_models

    ckpt = make_chat_checkpoint(tmp_path / "lr=0.1", tokenizer)
    named, unnamed = load_served_models([f"base={ckpt}"]), load_served_models([str(ckpt)])
    assert (named[0].name, named[0].checkpoint) == ("base", ckpt)
    assert unnamed[0].checkpoint == ckpt
    with pytest.raises(UserError, match="NAME=PATH needs a path"):  # `base=$CKPT` with CKPT unset
        load_served_models(["base="])
