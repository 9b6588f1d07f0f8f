"""Preference data and DPO: masks on the final reply only, the loss on a hand example, training
from a frozen reference, and the guards against NaN and a loss stuck at log 2."""

import json
import math

import pytest
import torch

from tinyllm.config import DPOConfig, ModelConfig, RuntimeConfig
from tinyllm.data.jsonl import read_jsonl
from tinyllm.data.preference import PreferenceBatches, encode_pairs, pack_pairs, pairs_drawn, validate_preference
from tinyllm.data.tokenizer import ENDOFTEXT, IM_END
from tinyllm.errors import DataError
from tinyllm.model.transformer import Transformer
from tinyllm.train.distributed import Dist, rank_share
from tinyllm.train.dpo import pair_logprobs
from tinyllm.train.loop import fit
from tinyllm.train.objectives import DPOLoss, dpo_loss, packed_sequence_logprobs

CONTEXT = [{"role": "user", "content": "李明住在哪里？"}, {"role": "assistant", "content": "李明住在杭州。"},
           {"role": "user", "content": "他养了什么宠物？"}]
PAIR = {"chosen": CONTEXT + [{"role": "assistant", "content": "李明的宠物是猫。"}],
        "rejected": CONTEXT + [{"role": "assistant", "content": "我不知道，别问我。"}]}
CPU = RuntimeConfig(device="cpu")


def test_dpo_loss_on_a_hand_computed_example():
    # chosen reply: policy 1 nat above the reference; rejected: 1 nat below. β = 0.1.
    policy = torch.tensor([-4.0, -9.0])  # [chosen, rejected]
    ref = torch.tensor([-5.0, -8.0])
    loss, extras = dpo_loss(policy, ref, beta=0.1)
    # rewards 0.1·(+1) = 0.1 and 0.1·(−1) = −0.1, margin 0.2, loss = log(1 + e^−0.2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert extras["chosen_reward"].item() == pytest.approx(0.1)
    assert extras["rejected_reward"].item() == pytest.approx(-0.1)
    assert extras["margin"].item() == pytest.approx(0.2) and extras["reward_accuracy"].item() == 1.0
    # the sign convention: preferring the rejected reply costs more than log 2
    assert dpo_loss(policy.flip(0), ref.flip(0), beta=0.1)[0].item() > math.log(2) > loss.item()
    assert dpo_loss(ref, ref, beta=0.1)[0].item() == pytest.approx(math.log(2))


def test_only_the_final_reply_carries_labels(tokenizer):
    [(chosen, rejected)] = encode_pairs(tokenizer, [PAIR])
    for (ids, mask), reply in ((chosen, "李明的宠物是猫。"), (rejected, "我不知道，别问我。")):
        assert tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False) == reply + IM_END


def test_validation_rejects_pairs_that_cannot_teach_anything():
    assert validate_preference(PAIR) is None
    same = {"chosen": PAIR["chosen"], "rejected": PAIR["chosen"]}
    assert "identical" in validate_preference(same)
    other_context = {"chosen": PAIR["chosen"], "rejected": [{"role": "user", "content": "x"}] + PAIR["rejected"][1:]}
    assert "share every message" in validate_preference(other_context)
    assert "rejected: the last message" in validate_preference({"chosen": PAIR["chosen"], "rejected": CONTEXT})


def test_a_useless_pair_in_a_file_is_named_by_line(tmp_path):
    path = tmp_path / "dpo.jsonl"
    same = {"chosen": PAIR["chosen"], "rejected": PAIR["chosen"]}
    path.write_text(json.dumps(PAIR, ensure_ascii=False) + "\n" + json.dumps(same, ensure_ascii=False) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*identical"):
        list(read_jsonl(path, validate_preference))


def _segment_text(tokenizer, batch, segment: int) -> str:
    return tokenizer.decode(batch["input_ids"][batch["segments"] == segment].tolist(), skip_special_tokens=False)


def test_batches_number_chosen_sides_first_with_their_own_reference_logps(tokenizer):
    pairs = _pairs(tokenizer, 5)  # distinct chosen replies: "李明的宠物是猫0。" ... "猫4。"
    ref = torch.tensor([[-10.0 * i, -10.0 * i - 1] for i in range(5)])  # pair i: (-10i, -10i - 1)
    batch = next(iter(PreferenceBatches(pairs, ref, batch_size=3, seq_len=255, seed=0,
                                        pad_id=tokenizer.token_to_id(ENDOFTEXT))))
    assert batch["input_ids"].shape[1] == 255 and batch["input_ids"].shape[0] < 6  # packed: fewer rows than sequences
    assert batch["padding"].equal(batch["segments"] < 0)
    assert set(batch["segments"].unique().tolist()) - {-1} == set(range(6))
    for seq in range(3):
        i = int(_segment_text(tokenizer, batch, seq).split("猫")[1][0])  # which pair this chosen side came from
        assert batch["ref_logps"][seq].item() == -10.0 * i  # its own chosen reference log-prob
        assert batch["ref_logps"][seq + 3].item() == -10.0 * i - 1  # and its rejected side's, 3 on
        rejected = _segment_text(tokenizer, batch, seq + 3)
        assert "我不知道" in rejected and "猫" not in rejected.split("他养了什么宠物？")[1]


def test_shares_of_a_packed_batch_hold_whole_pairs(tokenizer):
    """Under 2 processes each rank's rows (rank_share: rows [rank::2]) hold its pairs, both sides,
    numbered as its own [rank::2] slice of the reference log-probs."""
    pairs = _pairs(tokenizer, 8)
    ref = torch.tensor([[-10.0 * i, -10.0 * i - 1] for i in range(8)])
    batch = next(iter(PreferenceBatches(pairs, ref, batch_size=4, seq_len=255, seed=0,
                                        pad_id=tokenizer.token_to_id(ENDOFTEXT), shares=2)))
    for rank in range(2):
        share = next(rank_share([batch], Dist(rank=rank, world_size=2, local_rank=rank)))
        assert set(share["segments"].unique().tolist()) - {-1} == {0, 1, 2, 3}
        for seq in range(2):
            i = int(_segment_text(tokenizer, share, seq).split("猫")[1][0])
            assert share["ref_logps"][seq].item() == -10.0 * i and share["ref_logps"][seq + 2].item() == -10.0 * i - 1
            assert "我不知道" in _segment_text(tokenizer, share, seq + 2)


def _pairs(tokenizer, n=8):
    records = [json.loads(json.dumps(PAIR)) for _ in range(n)]
    for i, p in enumerate(records):
        p["chosen"][-1]["content"] = f"李明的宠物是猫{i}。"
    return encode_pairs(tokenizer, records)


def _config(tokenizer):
    return ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=256,
                       vocab_size=tokenizer.get_vocab_size())


@torch.no_grad()
def test_packed_sequence_logprobs_equal_each_sequence_scored_alone(tokenizer):
    torch.manual_seed(0)
    model = Transformer(_config(tokenizer)).eval()
    pairs = _pairs(tokenizer, 3)
    batch = pack_pairs(pairs, seq_len=255, pad_id=tokenizer.token_to_id(ENDOFTEXT))
    assert batch["input_ids"].shape[0] < 6  # several sequences share a row
    logps, counts = packed_sequence_logprobs(model, batch, 6)
    for seq, (ids, mask) in enumerate([pair[side] for side in (0, 1) for pair in pairs]):
        logits = model(torch.from_numpy(ids[:-1])[None]).logits[0].double().log_softmax(-1)
        targets = [(t, int(ids[t + 1])) for t in range(len(ids) - 1) if mask[t + 1]]
        assert logps[seq].item() == pytest.approx(float(sum(logits[t, y] for t, y in targets)), abs=1e-4)
        assert counts[seq].item() == len(targets)


def test_training_starts_at_log2_and_prefers_the_chosen_replies(tokenizer):
    torch.manual_seed(0)
    model = Transformer(_config(tokenizer))
    pad = tokenizer.token_to_id(ENDOFTEXT)
    pairs = _pairs(tokenizer)
    ref = pair_logprobs(model, pairs, 255, pad, torch.device("cpu"), torch.float32)
    batches = PreferenceBatches(pairs, ref, batch_size=4, seq_len=255, seed=0, pad_id=pad)
    first_loss, _ = DPOLoss(0.1)(model, next(iter(batches)))
    assert first_loss.item() == pytest.approx(math.log(2), abs=1e-5)  # π = π_ref: masks and precision agree
    cfg = DPOConfig(max_steps=30, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_interval=10)
    result = fit(model, DPOLoss(0.1), batches, cfg, CPU)
    assert result.final["train/loss"] < 0.6
    assert result.final["train/reward_accuracy"] == 1.0 and result.final["train/margin"] > 0
    after = pair_logprobs(model, pairs, 255, pad, torch.device("cpu"), torch.float32)
    assert ((after[:, 0] - ref[:, 0]) > (after[:, 1] - ref[:, 1])).all()


def test_the_nll_term_adds_the_chosen_replies_mean_token_nll(tokenizer):
    """RPO: loss = DPO loss + nll_coef · (−Σ log p(chosen tokens) / number of chosen tokens)."""
    torch.manual_seed(0)
    model = Transformer(_config(tokenizer))
    batch = {**pack_pairs(_pairs(tokenizer, 2), seq_len=255, pad_id=tokenizer.token_to_id(ENDOFTEXT)),
             "ref_logps": torch.zeros(4)}
    plain, _ = DPOLoss(0.1)(model, batch)
    with_nll, extras = DPOLoss(0.1, nll_coef=0.5)(model, batch)
    logps, counts = packed_sequence_logprobs(model, batch, 4)
    chosen, chosen_tokens = logps[:2], int(counts[:2].sum())
    assert chosen_tokens == sum(int(mask.sum()) for (_, mask), _ in _pairs(tokenizer, 2))
    assert extras["chosen_nll"].item() == pytest.approx(-chosen.sum().item() / chosen_tokens)
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * extras["chosen_nll"].item())


def test_the_reference_is_scored_for_the_pairs_the_batches_draw(tokenizer):
    """`pairs_drawn` names exactly the pairs of a run's first batches while it stays in its first
    epoch (DPO scores the reference on those alone), and every pair once it reaches a second."""
    pairs = _pairs(tokenizer, 10)
    ref = torch.tensor([[float(i), -float(i)] for i in range(10)])  # a pair's chosen reference = its index
    batches = iter(PreferenceBatches(pairs, ref, batch_size=3, seq_len=255, seed=7,
                                     pad_id=tokenizer.token_to_id(ENDOFTEXT)))
    drawn = set()
    for n in range(1, 5):
        drawn |= {int(v) for v in next(batches)["ref_logps"][:3].tolist()}
        if n * 3 < 10:
            assert set(pairs_drawn(10, 3, seed=7, batches=n).tolist()) == drawn
        else:
            assert pairs_drawn(10, 3, seed=7, batches=n).tolist() == list(range(10))


def test_a_dpo_run_shorter_than_an_epoch_scores_only_its_pairs(tmp_path, tokenizer):
    """12 pairs, 3 steps of 2: the reference pass scores 6, and training sees no pair it skipped
    (an unscored pair would carry a NaN reference into the loss)."""
    from conftest import make_chat_checkpoint

    from tinyllm.config import parse_params
    from tinyllm.train.dpo import run_dpo

    records = [json.loads(json.dumps(PAIR)) for _ in range(12)]
    for i, record in enumerate(records):
        record["chosen"][-1]["content"] = f"李明的宠物是猫{i}。"
    pairs_file = tmp_path / "dpo.jsonl"
    pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    params = parse_params({"runtime": {"device": "cpu", "dtype": "float32"}, "checkpoint": {"interval": 0},
                           "dpo": {"batch_size": 2, "max_steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_interval": 1}})
    init = make_chat_checkpoint(tmp_path, tokenizer)
    summary = run_dpo(params, init, pairs_file, tmp_path / "dpo")
    assert summary["pairs"] == 12 and summary["reference_pairs"] == 6
    assert math.isfinite(summary["train/loss"]) and (tmp_path / "dpo" / "model.safetensors").exists()


def test_batches_padded_to_the_most_rows_have_one_shape_and_the_same_loss(tokenizer):
    """Where the step replays as CUDA graphs, DPO pads every batch to `most_rows` of the run's
    batches: one shape for all of them, and the padding rows change no loss or metric."""
    records = [json.loads(json.dumps(PAIR)) for _ in range(10)]
    for i, p in enumerate(records):
        p["chosen"][-1]["content"] = "李明的宠物是猫" * (1 + 4 * (i % 4)) + f"{i}。"  # 89 to 221 tokens a side
    pairs = encode_pairs(tokenizer, records)
    ref, pad = torch.zeros(10, 2), tokenizer.token_to_id(ENDOFTEXT)

    def stream(**kw):
        return PreferenceBatches(pairs, ref, batch_size=4, seq_len=255, seed=17, pad_id=pad, **kw)

    plain = [batch for batch, _ in zip(stream(), range(6), strict=False)]  # 2 batches an epoch: three epochs
    rows = [batch["input_ids"].shape[0] for batch in plain]
    assert max(rows[:5]) < rows[5]  # the most rows come in the third epoch's last batch
    assert (stream().most_rows(5), stream().most_rows(6)) == (max(rows[:5]), rows[5])
    padded = [batch for batch, _ in zip(stream(rows=rows[5]), range(6), strict=False)]
    assert {batch["input_ids"].shape for batch in padded} == {(rows[5], 255)}
    torch.manual_seed(0)
    model, objective = Transformer(_config(tokenizer)), DPOLoss(0.1, nll_coef=0.5)
    for a, b in zip(plain, padded, strict=True):
        assert torch.equal(a["ref_logps"], b["ref_logps"])
        (loss_a, extras_a), (loss_b, extras_b) = objective(model, a), objective(model, b)
        assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-6)
        assert extras_b["chosen_nll"].item() == pytest.approx(extras_a["chosen_nll"].item(), abs=1e-6)
    # with two processes: the most rows of one process's share
    shares = [batch["input_ids"].shape[0] // 2 for batch, _ in zip(stream(shares=2), range(6), strict=False)]
    assert stream(shares=2).most_rows(6) == max(shares)


def test_dpo_pads_its_batches_to_one_shape_where_the_step_would_replay(tmp_path, tokenizer, monkeypatch):
    """run_dpo asks `step_replays` (yes only on a GPU); where it says yes, every batch has the
    most rows of the run's batches and `fit` hears that the shapes are fixed. The answer is forced
    here, on the CPU, where the engine itself still replays nothing."""
    from conftest import make_chat_checkpoint

    from tinyllm.config import parse_params
    from tinyllm.train import dpo

    records = [json.loads(json.dumps(PAIR)) for _ in range(12)]
    for i, record in enumerate(records):
        record["chosen"][-1]["content"] = "李明的宠物是猫" * (1 + 4 * (i % 4)) + f"{i}。"
    pairs_file = tmp_path / "dpo.jsonl"
    pairs_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    params = parse_params({"runtime": {"device": "cpu", "dtype": "float32"}, "checkpoint": {"interval": 0},
                           "dpo": {"batch_size": 4, "max_steps": 6, "lr": 1e-3, "warmup_steps": 1, "log_interval": 3}})
    init = make_chat_checkpoint(tmp_path, tokenizer, max_seq_len=256)
    real_fit, seen = dpo.fit, []

    def recording_fit(model, objective, batches, *args, **kwargs):
        shapes = []
        seen.append((kwargs["fixed_shapes"], shapes))

        def recorded():
            for batch in batches:
                shapes.append(tuple(batch["input_ids"].shape))
                yield batch
        return real_fit(model, objective, recorded(), *args, **kwargs)

    monkeypatch.setattr(dpo, "fit", recording_fit)
    for graphs in (False, True):
        monkeypatch.setattr(dpo, "step_replays", lambda *args, graphs=graphs, **kwargs: graphs)
        summary = dpo.run_dpo(params, init, pairs_file, tmp_path / f"dpo_{graphs}")
        assert math.isfinite(summary["train/loss"])
    (plain_fixed, plain), (padded_fixed, padded) = seen
    assert (plain_fixed, padded_fixed) == (False, True)
    assert len(plain) == len(padded) == 6 and len(set(plain)) > 1  # the packing varies by itself
    assert set(padded) == {max(plain)}
