import json

import numpy as np
import pytest
import torch

from tinyllm.config import TokenizeConfig
from tinyllm.data.tokenizer import ENDOFTEXT
from tinyllm.data.tokens import PackedBatches, TokenStream, tokenize_corpus
from tinyllm.errors import DataError


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def token_dir(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [f"第{i}篇：李明住在杭州。doc {i}" for i in range(200)])
    tokenize_corpus(corpus, tokenizer, TokenizeConfig(val_fraction=0.2, shard_tokens=500, batch_docs=16),
                    seed=3, out_dir=tmp_path / "tokens")
    return tmp_path / "tokens"


def test_documents_are_joined_by_endoftext_and_split_by_document(token_dir, tokenizer):
    index = json.loads((token_dir / "index.json").read_text())
    assert index["dtype"] == "uint16"
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["n_docs"] + val["n_docs"] == 200
    assert 20 <= val["n_docs"] <= 60  # val_fraction 0.2, seeded
    assert len(train["shards"]) > 1  # shard_tokens=500 forces several shards
    eot = tokenizer.token_to_id(ENDOFTEXT)
    for split in ("train", "val"):
        stream = TokenStream(token_dir, split)
        tokens = stream.window(0, len(stream))
        assert (tokens == eot).sum() == index["splits"][split]["n_docs"]
        assert tokens[-1] == eot
        docs = tokenizer.decode(tokens.tolist(), skip_special_tokens=False).split(ENDOFTEXT)[:-1]
        assert all(d.startswith("第") and "李明住在杭州" in d for d in docs)


def test_same_seed_same_tokens(tmp_path, tokenizer, token_dir):
    corpus = write_corpus(tmp_path / "again.jsonl", [f"第{i}篇：李明住在杭州。doc {i}" for i in range(200)])
    tokenize_corpus(corpus, tokenizer, TokenizeConfig(val_fraction=0.2, shard_tokens=500, batch_docs=7),
                    seed=3, out_dir=tmp_path / "again")
    for split in ("train", "val"):
        a, b = TokenStream(token_dir, split), TokenStream(tmp_path / "again", split)
        assert np.array_equal(a.window(0, len(a)), b.window(0, len(b)))


def test_window_stitches_across_shard_boundaries(token_dir):
    stream = TokenStream(token_dir, "train")
    whole = np.concatenate([np.asarray(s, dtype=np.int64) for s in stream.shards])
    boundary = int(stream.starts[1])
    assert np.array_equal(stream.window(boundary - 5, 10), whole[boundary - 5: boundary + 5])
    with pytest.raises(IndexError):
        stream.window(len(stream) - 3, 10)


def arange_tokens(tmp_path, n_tokens=1000, shard_at=333):
    """A token folder whose stream is 0, 1, 2, ...: every window is recognisable by its first token."""
    tokens = np.arange(n_tokens, dtype=np.uint16)
    (tmp_path / "train_0000.bin").write_bytes(tokens[:shard_at].tobytes())
    (tmp_path / "train_0001.bin").write_bytes(tokens[shard_at:].tobytes())
    shards = [{"file": "train_0000.bin", "n_tokens": shard_at},
              {"file": "train_0001.bin", "n_tokens": n_tokens - shard_at}]
    index = {"dtype": "uint16", "vocab_size": 65536, "endoftext_id": 0,
             "splits": {"train": {"shards": shards, "n_tokens": n_tokens, "n_docs": 1}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    return TokenStream(tmp_path, "train")


def test_packed_batches_shift_by_one_and_cover_each_window_once_per_epoch(tmp_path):
    stream = arange_tokens(tmp_path)
    packer = PackedBatches(stream, batch_size=4, seq_len=16, seed=0)
    assert packer.n_windows == (1000 - 1) // 16
    it = iter(packer)
    starts = []
    for _ in range(packer.n_windows // 4):
        batch = next(it)
        assert batch["input_ids"].shape == (4, 16)
        assert (batch["labels"] == batch["input_ids"] + 1).all()  # targets are the next tokens
        for row in batch["input_ids"]:
            assert (row == torch.arange(row[0], row[0] + 16)).all()  # contiguous, also across the shard cut
            starts.append(int(row[0]))
    assert len(set(starts)) == len(starts) == 60  # no window twice in an epoch (62 windows, 2 left as the tail)
    assert all(s % 16 == 0 and s // 16 < packer.n_windows for s in starts)
    assert starts != sorted(starts)  # shuffled
    next(it)
    assert packer.epoch == 1  # the ragged tail was dropped and a new epoch began


def test_ranks_get_disjoint_windows_and_state_resumes(token_dir):
    stream = TokenStream(token_dir, "train")
    a = next(iter(PackedBatches(stream, 2, 16, seed=1, rank=0, world_size=2)))
    b = next(iter(PackedBatches(stream, 2, 16, seed=1, rank=1, world_size=2)))
    assert not any((ra == rb).all() for ra in a["input_ids"] for rb in b["input_ids"])
    packer = PackedBatches(stream, 2, 16, seed=1)
    it = iter(packer)
    next(it), next(it)
    state = packer.state()
    expected = next(it)
    resumed = PackedBatches(stream, 2, 16, seed=1)
    resumed.load_state(state)
    assert (next(iter(resumed))["input_ids"] == expected["input_ids"]).all()


def test_too_little_data_for_a_batch_is_a_clear_error(token_dir):
    with pytest.raises(DataError, match="fewer than batch_size"):
        PackedBatches(TokenStream(token_dir, "val"), batch_size=10_000, seq_len=16, seed=0)


def test_empty_split_is_an_error_and_keeps_old_tokens(tmp_path, tokenizer, token_dir):
    corpus = write_corpus(tmp_path / "one.jsonl", ["只有一篇"])
    before = (token_dir / "index.json").read_text()
    with pytest.raises(DataError, match="split got no documents"):
        tokenize_corpus(corpus, tokenizer, TokenizeConfig(val_fraction=0.5), seed=0, out_dir=token_dir)
    assert (token_dir / "index.json").read_text() == before


def test_perplexity_in_batches_of_windows_is_that_of_one_window_at_a_time(token_dir, tokenizer):
    """Batching the val windows (a GPU's speed) scores the same windows the same way: 30 windows
    go in batches of 6 when 8 are allowed, so none is left out."""
    from tinyllm.config import ModelConfig
    from tinyllm.eval.metrics import perplexity
    from tinyllm.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16,
                                    vocab_size=tokenizer.get_vocab_size()))
    cpu = torch.device("cpu")
    one = perplexity(model, token_dir, 16, 16 * 30, cpu, torch.float32, rows=1)
    batched = perplexity(model, token_dir, 16, 16 * 30, cpu, torch.float32, rows=8)
    assert one["tokens"] == batched["tokens"] == 16 * 30
    assert batched["loss"] == pytest.approx(one["loss"], abs=1e-5)
    all_windows = (len(TokenStream(token_dir, "val")) - 1) // 16
    assert perplexity(model, token_dir, 16, 10**9, cpu, torch.float32)["tokens"] == all_windows * 16
