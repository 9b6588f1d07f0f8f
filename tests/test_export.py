"""Export to Hugging Face transformers and back, checked against the real library, offline:
same logits, same greedy tokens (stopping at <|im_end|>), peft adapter = our merged model, and an
exact round trip."""

import dataclasses
import os

import pytest
import torch
from conftest import make_chat_checkpoint
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from tinyllm.cli import main
from tinyllm.config import LoRAConfig, MoEConfig
from tinyllm.data.tokenizer import IM_END, load_tokenizer, render_chat, special_id
from tinyllm.export import export_hf
from tinyllm.infer.generate import generate
from tinyllm.train.checkpoint import load_model, save_checkpoint

MOE = {"dense": None,
       "moe": MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=1, top_k=2, first_dense_layers=1),
       "moe-no-shared": MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=0, top_k=1, norm_topk_prob=False,
                                  first_dense_layers=0)}


@pytest.fixture(params=list(MOE))
def checkpoint(request, tmp_path, tokenizer):
    return make_chat_checkpoint(tmp_path / "src", tokenizer, max_seq_len=64, moe=MOE[request.param])


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def test_exported_model_loads_as_a_stock_architecture_with_the_same_logits(checkpoint, tmp_path):
    out = export_hf(checkpoint, tmp_path / "hf")
    hf = _hf(out)
    ours = load_model(checkpoint).eval()
    assert type(hf).__name__ == ("Qwen2MoeForCausalLM" if ours.config.moe.enabled else "LlamaForCausalLM")
    ids = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-4
    card = (out / "README.md").read_text()
    assert "| dim | 32 |" in card and f"Loads as a stock `{type(hf).__name__}`" in card  # the card names what loads


@torch.no_grad()
def test_generate_with_the_chat_template_matches_our_engine_and_stops_at_im_end(checkpoint, tmp_path, tokenizer):
    model = load_model(checkpoint).eval()
    tok = load_tokenizer(checkpoint)
    im_end = special_id(tok, IM_END)
    prompt = tok.encode(render_chat([{"role": "user", "content": "李明住在哪里？"}], add_generation_prompt=True),
                        add_special_tokens=False).ids
    free = generate(model, prompt, 12)
    # make <|im_end|> the greedy choice where the 6th token was chosen: the reply must stop there
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie: only outputs change
    model.config = dataclasses.replace(model.config, tie_embeddings=False)
    model.lm_head.weight.data[im_end] = 3 * model.lm_head.weight.data[free[5]]
    save_checkpoint(model, tmp_path / "stopper", tokenizer_dir=checkpoint)
    ours = generate(load_model(tmp_path / "stopper").eval(), prompt, 30, stop_ids={im_end})
    assert len(ours) < 30  # our engine stopped on <|im_end|>

    out = export_hf(tmp_path / "stopper", tmp_path / "hf")
    hf, hf_tok = _hf(out), transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "李明住在哪里？"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=False)
    assert ids[0].tolist() == prompt  # the same chat template
    new = hf.generate(ids, max_new_tokens=30)[0, ids.shape[1]:].tolist()
    assert new == ours + [im_end]  # same tokens, and generate() stopped at <|im_end|> by itself


@torch.no_grad()
def test_the_exported_peft_adapter_on_the_hf_model_equals_our_merged_model(checkpoint, tmp_path):
    from peft import PeftModel

    from tinyllm.train.lora import add_lora

    peft_model = add_lora(load_model(checkpoint), LoRAConfig(rank=4, alpha=8.0), base_dir=checkpoint)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    merged = peft_model.merge_and_unload().eval()

    out = export_hf(checkpoint, tmp_path / "hf", adapter=tmp_path / "adapter")
    hf = PeftModel.from_pretrained(_hf(out), str(out / "adapter")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (hf(ids).logits - merged(ids).logits).abs().max() <= 1e-4
    assert (hf(ids).logits - load_model(checkpoint)(ids).logits).abs().max() > 1e-3  # the adapter does something


def test_export_then_import_reproduces_the_weights_exactly(checkpoint, tmp_path):
    main(["export", str(checkpoint), str(tmp_path / "hf")])
    main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])
    before = load_file(str(checkpoint / "model.safetensors"))
    after = load_file(str(tmp_path / "back/model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    back, original = load_model(tmp_path / "back").eval(), load_model(checkpoint).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, original(ids).logits)
    # the same config, with an MoE's default expert width written out
    width = original.config.moe.expert_hidden_dim or original.config.ffn_dim // 4
    assert back.config == dataclasses.replace(original.config, moe=dataclasses.replace(
        original.config.moe, expert_hidden_dim=width if original.config.moe.enabled else None))
    assert (tmp_path / "back/tokenizer.json").read_text() == (checkpoint / "tokenizer.json").read_text()


def test_import_refuses_a_folder_that_is_not_a_llama(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2/config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(SystemExit, match="only LlamaForCausalLM and"):
        main(["import", str(tmp_path / "gpt2"), str(tmp_path / "out")])


def test_export_and_import_refuse_to_delete_what_they_did_not_write(tmp_path, tokenizer):
    """The output folder is replaced whole: an earlier output of the same command may go, anything
    else stays, and so does the source (and the .tmp folder the write goes through)."""
    import shutil

    ckpt = make_chat_checkpoint(tmp_path / "src", tokenizer, max_seq_len=64)
    other = make_chat_checkpoint(tmp_path / "other", tokenizer, max_seq_len=64)  # another stage's checkpoint
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    for args, message in ((["export", str(ckpt), str(tmp_path / "mine")], "not an earlier output"),
                          (["export", str(ckpt), str(other)], "not an earlier output"),
                          (["export", str(ckpt), str(ckpt)], "which it is made from")):
        with pytest.raises(SystemExit, match=message):
            main(args)
    hf = export_hf(ckpt, tmp_path / "hf")
    assert export_hf(ckpt, hf) == hf  # an earlier export is replaced
    shutil.copytree(ckpt, hf / "inside")
    shutil.copytree(ckpt, tmp_path / "hf.tmp")
    for source in (hf / "inside", tmp_path / "hf.tmp"):  # the output holds it, or the write goes through it
        with pytest.raises(SystemExit, match="which it is made from"):
            main(["export", str(source), str(hf)])
    with pytest.raises(SystemExit, match="not an earlier output"):  # import replaces native checkpoints only
        main(["import", str(hf), str(tmp_path / "mine")])
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me" and (ckpt / "model.safetensors").is_file()
    main(["import", str(hf), str(other)])
    assert load_model(other).config == load_model(ckpt).config
