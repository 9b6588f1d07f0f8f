"""JSON Lines reading: bad lines are named by path:line, skip mode counts them, writes are atomic."""

import json
import logging

import pytest

from tinyllm.data.jsonl import DataError, read_jsonl, validate_pretrain, write_jsonl


def _file(tmp_path, *lines: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = '{"text": "你好，世界"}'.encode()


def test_reads_valid_records_and_skips_blank_lines(tmp_path):
    path = _file(tmp_path, GOOD, b"", b"   ", b'{"text": "second", "extra": 1}')
    assert list(read_jsonl(path, validate_pretrain)) == [{"text": "你好，世界"}, {"text": "second", "extra": 1}]


def test_byte_order_mark_on_first_line_is_accepted(tmp_path):
    path = _file(tmp_path, b"\xef\xbb\xbf" + GOOD)
    assert list(read_jsonl(path, validate_pretrain)) == [{"text": "你好，世界"}]


@pytest.mark.parametrize("bad, reason", [
    (b'{"text": "unclosed', "not valid JSON"),
    (b'{"txt": "typo"}', 'missing "text"'),
    (b'{"text": 3}', '"text" must be a string'),
    (b'{"text": "  "}', '"text" is empty'),
    (b'["text", "a list"]', "expected an object"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
])
def test_bad_line_is_a_data_error_naming_path_and_line(tmp_path, bad, reason):
    path = _file(tmp_path, GOOD, bad, GOOD)
    with pytest.raises(DataError) as err:
        list(read_jsonl(path, validate_pretrain))
    assert str(err.value).startswith(f"{path}:2: ")
    assert reason in str(err.value)


def test_skip_mode_counts_bad_lines_and_keeps_good_ones(tmp_path, caplog):
    path = _file(tmp_path, GOOD, b"not json", b"", b'{"nope": 1}', b'{"text": "ok"}')
    reader = read_jsonl(path, validate_pretrain, on_bad_line="skip")
    with caplog.at_level(logging.WARNING):
        records = list(reader)
    assert [r["text"] for r in records] == ["你好，世界", "ok"]
    assert reader.n_bad == 2
    assert f"{path}:2:" in caplog.text and f"{path}:4:" in caplog.text


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl", validate_pretrain)


def test_write_jsonl_round_trips_unescaped_utf8(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    records = [{"text": "李明住在杭州。"}, {"text": "Li Ming lives in Hangzhou."}]
    assert write_jsonl(path, records) == 2
    assert "李明" in path.read_text(encoding="utf-8")
    assert list(read_jsonl(path, validate_pretrain)) == records


def test_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"text": "old"}\n', encoding="utf-8")

    def records():
        yield {"text": "new"}
        raise RuntimeError("input broke halfway")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert json.loads(path.read_text(encoding="utf-8")) == {"text": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
