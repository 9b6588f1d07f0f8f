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
