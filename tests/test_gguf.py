"""GGUF export checked in real llama.cpp (llama-cpp-python, built from source): the same token ids
as our tokenizer, the same greedy continuations as our engine, and the Ollama Modelfile. The
trained pipeline model's f16 export is checked in tests/test_e2e.py."""

import random

import pytest
import torch
from conftest import llama_cpp_flip, make_chat_checkpoint, vary_weights

from tinyllm.cli import main
from tinyllm.config import MoEConfig
from tinyllm.data.tokenizer import IM_END, IM_START, load_tokenizer, render_chat
from tinyllm.errors import UserError
from tinyllm.export_gguf import export_gguf, interleave_rope_rows
from tinyllm.infer.generate import generate
from tinyllm.train.checkpoint import load_model, save_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")

PIECES = ["李明住在杭州。", "王芳是一名医生，", "Li Ming lives in Hangzhou.", " His pet is a cat", "3加5等于8", "12345",
          " 2024-12-03 ", "😀", "🎉🎉", "👩‍💻", "def f(x):\n    return x * 2\n", "   ", "\n\n", "\t", "  \n ",
          "日本語のテキスト",
          "한국어 문장", "Привет, мир", "مرحبا", "é à ü ß", "々〇㐀𠀀", "中文abc混合123", "don't", "I'll", "x+=1;",
          "<|im_start|>user\n你好<|im_end|>\n", "<|endoftext|>", "\u200b", "ﬁ", "！？。，", "A", "a b  c   d"]


def strings(count: int, seed: int = 0) -> list[str]:
    """Mixed scripts, emoji, code, digits, runs of spaces and newlines, and chat markers."""
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8))) for _ in range(count)]


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, seed=0, **kwargs)


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tokenizer):
    """A random model large enough that its greedy replies vary, saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("gguf")
    ckpt = make_chat_checkpoint(folder, tokenizer, max_seq_len=128)
    save_checkpoint(vary_weights(load_model(ckpt)), ckpt, tokenizer_dir=ckpt)
    return ckpt


def test_llama_cpp_tokenizes_1000_strings_exactly_as_we_do(varied, tmp_path):
    path = export_gguf(varied, tmp_path / "m.gguf", "f32")
    ours, theirs = load_tokenizer(varied), llama(path, vocab_only=True)
    texts = strings(1000)
    assert sum(IM_START in t for t in texts) > 50 and sum("中" in t for t in texts) > 50
    differ = [t for t in texts if theirs.tokenize(t.encode(), add_bos=False, special=True) != ours.encode(t).ids]
    assert not differ, f"{len(differ)} of 1000 differ, e.g. {differ[:3]}"


def test_rope_rows_are_interleaved_per_head():
    rows = torch.arange(8.0)[:, None]  # 2 heads of 4: [0 1 | 2 3], [4 5 | 6 7]
    assert interleave_rope_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("quantization", ["f32", "f16"])
def test_greedy_continuations_in_llama_cpp_equal_our_engine(varied, tmp_path, quantization):
    """20 prompts (plain and chat-templated), 32 tokens each. f32 must match exactly; f16 rounds the
    weights, so where it differs the two best logits of our engine must be a near tie there."""
    path = export_gguf(varied, tmp_path / "m.gguf", quantization)
    model, tok = load_model(varied), load_tokenizer(varied)
    theirs = llama(path, n_ctx=128)
    prompts = [text for text in strings(10, seed=1)] + [
        render_chat([{"role": "user", "content": text}], add_generation_prompt=True) for text in strings(10, seed=2)]
    flips = [flip for prompt in prompts if (flip := llama_cpp_flip(theirs, model, tok.encode(prompt).ids[:60], 32))]
    if quantization == "f32":
        assert flips == []
    else:
        assert len(flips) <= 4 and all(gap < 0.05 for _, gap in flips), flips


@pytest.mark.parametrize("shared", [1, 0])
def test_an_moe_llama_cpp_computes_exactly_goes_as_qwen2moe_with_our_greedy_replies(tmp_path, tokenizer, shared):
    """Softmax routing, top-k weights not renormalised, an MoE in every layer: llama.cpp's Qwen2-MoE
    computes that, so it is exported, with or without a shared expert. (llama.cpp adds the experts'
    outputs in another order, so in f32 a reply may flip where our two best logits nearly tie.)"""
    moe = MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=shared, top_k=2, norm_topk_prob=False,
                    first_dense_layers=0)
    ckpt = make_chat_checkpoint(tmp_path, tokenizer, max_seq_len=128, moe=moe)
    model = vary_weights(load_model(ckpt), seed=2)
    save_checkpoint(model, ckpt, tokenizer_dir=ckpt)
    theirs = llama(export_gguf(ckpt, tmp_path / "moe.gguf", "f32"), n_ctx=128)
    assert theirs.metadata["general.architecture"] == "qwen2moe"
    tok = load_tokenizer(ckpt)
    prompts = [tok.encode(text).ids[:60] for text in strings(8, seed=3)]
    replies = [generate(model, ids, 24) for ids in prompts]
    flips = [flip for ids in prompts if (flip := llama_cpp_flip(theirs, model, ids, 24))]
    assert len({tuple(r) for r in replies}) > 4  # the replies really differ
    assert len(flips) <= 2 and all(gap < 0.01 for _, gap in flips), flips


def test_the_cli_writes_gguf_with_a_modelfile_and_refuses_what_llama_cpp_cannot_run(varied, tmp_path, tokenizer,
                                                                                     capsys):
    main(["export", str(varied), str(tmp_path / "out" / "m.gguf"), "--format", "gguf", "--quantization", "q8_0"])
    assert "llama-cli -m" in capsys.readouterr().out
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert llama(tmp_path / "out" / "m.gguf", n_ctx=64).tokenize(b"hi", add_bos=False)  # loads
    moe = make_chat_checkpoint(tmp_path / "moe", tokenizer, moe=MoEConfig(enabled=True, n_routed_experts=4,
                                                                          n_shared_experts=1, top_k=2))
    with pytest.raises(UserError, match="cannot run this MoE exactly: it renormalises the top-k routing weights"):
        export_gguf(moe, tmp_path / "moe.gguf")
    with pytest.raises(SystemExit):
        main(["export", str(varied), str(tmp_path / "x.gguf"), "--format", "gguf", "--quantization", "q4"])
    assert "invalid choice: 'q4'" in capsys.readouterr().err
    assert not (tmp_path / "moe.gguf").exists() and not (tmp_path / "x.gguf").exists()


def test_chat_in_llama_cpp_uses_our_template_and_stops_at_im_end(varied, tmp_path):
    """llama.cpp's chat handler renders our template from the GGUF and ends the reply at <|im_end|>.
    The model is rigged so that <|im_end|> follows the generation prompt: its blocks add nothing,
    so the next token depends on the last one only, and <|im_end|>'s embedding points where the
    prompt's last token does."""
    model, tok = load_model(varied), load_tokenizer(varied)
    question = [{"role": "user", "content": "李明住在哪里？"}]
    ids = tok.encode(render_chat(question, add_generation_prompt=True)).ids
    end = tok.token_to_id(IM_END)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        embed = model.model.embed_tokens.weight
        embed[end] = 10 * embed[ids[-1]]
    save_checkpoint(model, tmp_path / "rigged", tokenizer_dir=varied)
    assert generate(model, ids, 8, stop_ids={end}) == []  # our engine stops at once
    theirs = llama(export_gguf(tmp_path / "rigged", tmp_path / "m.gguf", "f32"), n_ctx=128)
    assert theirs.token_eos() == end and theirs._model.token_eot() == end
    assert theirs.metadata["tokenizer.chat_template"] == (varied / "chat_template.jinja").read_text()
    answer = theirs.create_chat_completion(messages=question, temperature=0.0, top_k=1, max_tokens=8)["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"] == ""
