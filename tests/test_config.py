import pytest

from tinyllm.config import ConfigError, load_params, parse_params


def test_repository_params_file_is_valid():
    params = load_params("params.yaml")
    assert params.model.dim % params.model.n_heads == 0


def test_defaults_derive_head_and_ffn_dims():
    params = parse_params({"model": {"dim": 96, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": None}})
    assert params.model.head_dim == 24
    assert params.model.ffn_dim % params.model.multiple_of == 0 and params.model.ffn_dim >= 8 * 96 // 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"model": {"dim": 100, "n_heads": 3}}, "model.dim=100 must be divisible by model.n_heads=3"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads=3 must divide model.n_heads=4"),
        ({"model": {"dim": 36, "n_heads": 4, "n_kv_heads": 2}}, "head dim) must be even"),
        ({"pretrain": {"warmup_steps": 10, "max_steps": 5}}, "pretrain.warmup_steps=10 must be < pretrain.max_steps=5"),
        ({"pretrain": {"lr": "fast"}}, "pretrain.lr: expected float"),
        ({"model": {"layers": 4}}, "model.layers: unknown param"),
        ({"model": {"vocab_size": 5}}, "model.vocab_size is taken from the tokenizer"),
        ({"data": {"source": "files"}}, "data.pretrain must list at least one file"),
        ({"data": {"format": "csv"}}, "data.format='csv' must be auto or one of minimind_sft, sharegpt"),
        ({"data": {"min_chars": 10, "max_chars": 5}}, "need 0 <= min_chars <= max_chars"),
        ({"data": {"sft": ["chats.jsonl"]}}, "data.sft is read only when data.source is 'files'"),
        ({"data": {"world": {"arithmetic_answer": "cot"}}}, "data.world.arithmetic_answer='cot' must be 'steps'"),
        ({"runtime": {"dtype": "fp8"}}, "runtime.dtype='fp8'"),
        ({"runtime": {"threads": 0}}, "runtime.threads=0 must be auto, follow or a number of threads >= 1"),
        ({"runtime": {"threads": "all"}}, "runtime.threads='all' must be auto, follow"),
        ({"runtime": {"cuda_graphs": True}}, "runtime.cuda_graphs=True must be auto or false"),
        ({"runtime": {"compile_ahead": "yes"}}, "runtime.compile_ahead='yes' must be auto or false"),
        ({"model": {"dropout": 1.5}}, "model.dropout=1.5"),
        ({"sft": {"batch_size": 2, "pretrain_mix": 0.75}}, "sft.batch_size=2 with sft.pretrain_mix=0.75 leaves no row"),
        ({"eval": {"max_new_tokens": 128}}, "eval.max_new_tokens=128 must be below model.max_seq_len=128"),
        ({"dpo": {"eval_interval": 50}}, "dpo.eval_interval: dpo measures no validation loss"),
        ({"dpo": {"eval_interval": 200}}, "dpo.eval_interval: dpo measures no validation loss"),  # the default, named
        ({"lora": {"keep": "best"}}, "lora.keep: lora measures no validation loss"),
        ({"grpo": {"patience": 2}}, "grpo.patience: grpo measures no validation loss"),
        ({"grpo": {"seq_len": 0}}, "grpo.seq_len: grpo trains on rows of a prompt"),
        ({"sft": {"eval_interval": 50, "log_interval": 20}}, "sft.eval_interval=50 must be a multiple"),
    ],
)
def test_impossible_params_name_the_param(override, fragment):
    with pytest.raises(ConfigError, match="problem") as err:
        parse_params(override)
    assert fragment in str(err.value)


def test_a_stage_without_validation_takes_any_log_interval():
    """lora, dpo and grpo measure no validation loss, so their log interval need not divide one."""
    params = parse_params({"lora": {"log_interval": 30}, "grpo": {"log_interval": 3}})
    assert (params.lora.log_interval, params.grpo.log_interval) == (30, 3)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params({"model": {"n_heads": 4, "n_kv_heads": 3}, "pretrain": {"warmup_steps": 10, "max_steps": 5}})
    assert "2 problem(s)" in str(err.value)


def test_missing_params_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model: {dim: [\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(bad)


def test_post_training_sections_are_checked():
    with pytest.raises(ConfigError) as err:
        parse_params({"lora": {"batch_size": 2, "replay_fraction": 0.75, "rank": 0, "target_modules": "attn"},
                      "dpo": {"beta": 0}})
    text = str(err.value)
    assert "leaves no row for the identity chats" in text and "lora.rank=0 must be > 0" in text
    assert "lora.target_modules='attn'" in text and "dpo.beta=0.0 must be > 0" in text
    assert parse_params({"lora": {"target_modules": ["q_proj", "v_proj"]}}).lora.target_modules == ["q_proj", "v_proj"]


def test_validating_params_imports_neither_torch_nor_the_model():
    """config.py sits below the data and model layers: no import cycle, and checking params is light."""
    import subprocess
    import sys

    code = ("import sys, tinyllm.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('tinyllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['tinyllm.config', 'tinyllm.data', 'tinyllm.data.format_names', 'tinyllm.errors']"
