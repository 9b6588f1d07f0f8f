import json

import pytest

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


def _chat_checkpoint(tmp_path, tokenizer):
    import torch

    from tinyllm.config import ModelConfig
    from tinyllm.data.tokenizer import save_tokenizer
    from tinyllm.model.transformer import Transformer
    from tinyllm.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_tokenizer(tokenizer, tmp_path / "tok")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=64,
                      vocab_size=tokenizer.get_vocab_size())
    save_checkpoint(Transformer(cfg), tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    return tmp_path / "ckpt"


def _chat(args, stdin, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "tinyllm.cli", "chat", *args], input=stdin, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)


def test_chat_streams_replies_resets_and_exits(tmp_path, tokenizer):
    ckpt = _chat_checkpoint(tmp_path, tokenizer)
    proc = _chat([str(ckpt), "--temperature", "0", "--max-tokens", "5"], "李明住在哪里？\n/reset\n你好\n/exit\n不会读到\n",
                 tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"chatting with {ckpt}" in proc.stdout
    assert proc.stdout.count("assistant> ") == 2 and "(conversation cleared)" in proc.stdout


def test_chat_without_a_checkpoint_uses_the_newest_stage_or_says_what_to_do(tmp_path, tokenizer):
    proc = _chat([], "", tmp_path)
    assert proc.returncode == 1 and "no chat checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = _chat_checkpoint(tmp_path, tokenizer)
    (tmp_path / "artifacts").mkdir()
    ckpt.rename(tmp_path / "artifacts/sft")
    proc = _chat([], "/exit\n", tmp_path)
    assert proc.returncode == 0 and "chatting with artifacts/sft" in proc.stdout


def test_chat_rejects_bad_sampling_flags(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--top-p", "1.5"])
    assert "'1.5' must be in (0, 1]" in capsys.readouterr().err
