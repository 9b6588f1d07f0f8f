import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS

from tinyllm.config import TokenizerConfig
from tinyllm.data.chat import ChatBatches, encode_conversations
from tinyllm.data.chat_tokens import content_files, encode_chat_files, load_chats, read_chat_set, write_chat_set
from tinyllm.data.tokenizer import ENDOFTEXT, special_id, train_tokenizer
from tinyllm.errors import DataError

CONVERSATIONS = [
    [{"role": "user", "content": "李明住在哪里？"}, {"role": "assistant", "content": "李明住在杭州。"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "3加5等于几？"},
     {"role": "assistant", "content": "3加5等于8。"}, {"role": "user", "content": "And 12 minus 7?"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "Li Ming lives in Hangzhou.\n"}],
]


def write_jsonl(path: Path, conversations: list) -> Path:
    path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    return path


def same_examples(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x_ids, y_ids) and np.array_equal(x_mask, y_mask)
                                    for (x_ids, x_mask), (y_ids, y_mask) in zip(a, b))


@pytest.mark.parametrize("system_prompt", [None, "你是一个小助手。"])
def test_a_saved_set_reads_back_as_the_encoding_it_saved(tokenizer, tmp_path, system_prompt):
    examples = encode_conversations(tokenizer, CONVERSATIONS, system_prompt)
    meta = write_chat_set(tmp_path / "chats", examples, tokenizer, system_prompt)
    loaded = read_chat_set(tmp_path / "chats", tokenizer, system_prompt)
    assert same_examples(loaded, examples)
    assert meta["conversations"] == 3 and meta["tokens"] == sum(len(ids) for ids, _ in examples)
    assert meta["labelled"] == sum(int(mask.sum()) for _, mask in examples) > 0


def test_a_folder_and_a_jsonl_file_give_the_same_batches(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS * 7)
    encode_chat_files([file], tokenizer, None, tmp_path / "sets")
    from_file, from_set = (load_chats([source], tokenizer, None) for source in (file, tmp_path / "sets" / "sft"))
    assert same_examples(from_set, from_file)
    pad = special_id(tokenizer, ENDOFTEXT)
    batches = [itertools.islice(ChatBatches(examples, 4, 63, seed=3, pad_id=pad), 5)
               for examples in (from_file, from_set)]
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_an_empty_set_reads_back_empty(tokenizer, tmp_path):
    write_chat_set(tmp_path / "empty", [], tokenizer, None)
    assert read_chat_set(tmp_path / "empty", tokenizer, None) == []


def test_a_set_is_refused_with_another_system_prompt_or_tokenizer(tokenizer, tmp_path):
    write_chat_set(tmp_path / "chats", encode_conversations(tokenizer, CONVERSATIONS), tokenizer, None)
    with pytest.raises(DataError, match=r"chats: encoded with system prompt None, not sft.system_prompt='hi'"):
        read_chat_set(tmp_path / "chats", tokenizer, "hi")
    other = train_tokenizer(SAMPLE_TEXTS[::-1], TokenizerConfig(vocab_size=300))
    with pytest.raises(DataError, match="chats: encoded with another tokenizer"):
        read_chat_set(tmp_path / "chats", other, None)
    with pytest.raises(FileNotFoundError, match=r"missing: no encoded chats here \(run `dvc repro encode_chats`\)"):
        load_chats([tmp_path / "missing"], tokenizer, None)
    assert len(read_chat_set(tmp_path / "chats", tokenizer, "")) == 3  # no system prompt either way


def test_a_set_whose_arrays_do_not_match_its_meta_is_refused(tokenizer, tmp_path):
    write_chat_set(tmp_path / "chats", encode_conversations(tokenizer, CONVERSATIONS), tokenizer, None)
    np.save(tmp_path / "chats/ids.npy", np.load(tmp_path / "chats/ids.npy")[:-1])
    with pytest.raises(DataError, match="chats: its arrays do not match its meta.json"):
        read_chat_set(tmp_path / "chats", tokenizer, None)


def test_rewriting_a_set_replaces_it_whole_and_its_digest_follows_the_content(tokenizer, tmp_path):
    first = write_chat_set(tmp_path / "chats", encode_conversations(tokenizer, CONVERSATIONS), tokenizer, None)
    second = write_chat_set(tmp_path / "chats", encode_conversations(tokenizer, CONVERSATIONS[:1]), tokenizer, None)
    assert len(read_chat_set(tmp_path / "chats", tokenizer, None)) == 1
    assert first["sha256"] != second["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats"]  # no temporary or old set left
    assert content_files([tmp_path / "chats", tmp_path / "a.jsonl"]) == [tmp_path / "chats/meta.json",
                                                                         tmp_path / "a.jsonl"]


def run_stage(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.encode_chats"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_the_stage_encodes_every_chat_file_with_the_system_prompt(tokenizer, tmp_path):
    chat = tmp_path / "artifacts/data/chat"
    chat.mkdir(parents=True)
    (tmp_path / "params.yaml").write_text("sft:\n  system_prompt: 你是助手。\n", encoding="utf-8")
    proc = run_stage(tmp_path)
    assert proc.returncode == 2
    assert "artifacts/data/chat: no chat files to encode (run `dvc repro prepare`)" in proc.stderr
    write_jsonl(chat / "sft_single.jsonl", CONVERSATIONS[:1])
    write_jsonl(chat / "identity.jsonl", CONVERSATIONS[1:])
    (tmp_path / "artifacts/tokenizer").mkdir()
    tokenizer.save(str(tmp_path / "artifacts/tokenizer/tokenizer.json"))
    proc = run_stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports/metrics/chat_tokens.json").read_text())
    assert {name: m["conversations"] for name, m in metrics.items()} == {"identity": 2, "sft_single": 1}
    loaded = load_chats([tmp_path / "artifacts/chat_tokens/identity"], tokenizer, "你是助手。")
    assert same_examples(loaded, encode_conversations(tokenizer, CONVERSATIONS[1:], "你是助手。"))
