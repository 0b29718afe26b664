"""In-memory conversion both ways: transformers / TRL / PEFT PyTorch models <-> trlax, no files."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    CheckpointError,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    TrlaxError,
    create_reference_model,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

VOCAB = 101
ATOL = 1e-5


def _no_files(monkeypatch):
    """Make any checkpoint file access fail: conversion must not touch disk."""
    import trlax.checkpoint.reader as reader

    def refuse(*args, **kwargs):
        raise AssertionError("conversion opened a checkpoint file")

    monkeypatch.setattr(reader.SafetensorsFile, "__init__", refuse)


def _causal(model_type="gpt2"):
    torch.manual_seed(0)
    return torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]()), std=0.1)


# GPT-NeoX, Mixtral and Qwen3-MoE: transformers v5 renames or fuses their weights in memory (embed_out ->
# lm_head, one fused tensor per layer's experts) and converts them back when it saves.
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "mixtral", "qwen3_moe"])
def test_transformers_model_converts_in_memory_and_back(monkeypatch, model_type):
    _no_files(monkeypatch)
    pt = _causal(model_type)
    model = FlaxAutoModelForCausalLM.from_pretrained(pt)
    ids, mask = batch(VOCAB, "right", low=2)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask).logits, mask) < ATOL
    back = model.to_torch()
    assert type(back) is type(pt)
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, again, mask) < ATOL


def test_a_tied_gpt_neox_loaded_from_disk_converts_in_memory(tmp_path):
    """transformers reverts only what its loading converted: a tied GPT-NeoX read from a folder (no `embed_out` in
    the file) keeps its head as `lm_head` in state_dict(), which trlax refused as an unexpected tensor (its PEFT
    and TRL wrappers too). Tied copies are dropped now, as save_pretrained drops them."""
    import peft

    config = TINY_CAUSAL["gpt_neox"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1).save_pretrained(tmp_path)
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert "lm_head.weight" in pt.state_dict() and "embed_out.weight" not in pt.state_dict()
    ids, mask = batch(VOCAB, "right", low=2)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, FlaxAutoModelForCausalLM.from_pretrained(pt)(ids, mask).logits, mask) < ATOL
    lora = peft.get_peft_model(pt, peft.LoraConfig(r=2, target_modules=["query_key_value"]))
    assert FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lora).is_peft_model


def test_to_torch_keeps_the_generation_config():
    pt = _causal()
    pt.generation_config = transformers.GenerationConfig(max_new_tokens=3, eos_token_id=1, pad_token_id=1)
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt)
    for back in (model.to_torch().pretrained_model, model.pretrained_model.to_torch()):
        assert back.generation_config.max_new_tokens == 3
        assert back.generation_config.eos_token_id == 1
    assert model.pretrained_model.generation_config.max_new_tokens == 3  # a copy went to PyTorch


def test_merged_peft_model_is_refused():
    import peft

    peft_model = peft.get_peft_model(_causal("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.merge_adapter()  # the base layers now hold base + LoRA
    with pytest.raises(TrlaxError, match="unmerge_adapter"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    peft_model.unmerge_adapter()
    assert FlaxAutoModelForCausalLMWithValueHead.from_pretrained(peft_model).is_peft_model


def test_trl_value_head_model_converts_with_its_head():
    pt = _causal()
    trl_model = AutoModelForCausalLMWithValueHead(pt, v_head_init_strategy="normal").eval()
    trl_model.is_peft_model = False  # what TRL's from_pretrained sets; its constructor does not
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(trl_model, strict=True)
    ids, mask = batch(VOCAB, "right", low=2)
    with torch.no_grad():
        ref = trl_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = model(ids, mask)
    assert max_diff(ref[0], out[0], mask) < ATOL
    assert max_diff(ref[2], out[2], mask) < ATOL
    back = model.to_torch()
    assert isinstance(back, AutoModelForCausalLMWithValueHead)
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert max_diff(ref[0], again[0], mask) < ATOL
    assert max_diff(ref[2], again[2], mask) < ATOL
    reference = create_reference_model(model, num_shared_layers=1)  # the head came as numpy: copying it failed
    assert max_diff(ref[2], reference(ids, mask)[2], mask) < ATOL
    # A plain transformers model has no head: strict says so, as for a checkpoint without one.
    with pytest.raises(TrlaxError, match="no value head"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt, strict=True)


def test_post_init_restores_the_head_from_a_trl_state_dict():
    pt = _causal()
    trl_model = AutoModelForCausalLMWithValueHead(pt, v_head_init_strategy="normal").eval()
    trl_model.is_peft_model = False
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(pt, seed=3)  # a new head
    ids, mask = batch(VOCAB, "right", low=2)
    with torch.no_grad():
        ref = trl_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert max_diff(ref[2], model(ids, mask)[2], mask) > 1e-2
    model.post_init({**trl_model.state_dict(), "v_head.flatten.unknown": torch.zeros(2)})  # torch tensors
    assert max_diff(ref[2], model(ids, mask)[2], mask) < ATOL
    # A missing entry keeps its value; numpy works too; a misfit shape raises and changes nothing.
    kernel = np.asarray(model.params["v_head"]["summary"]["kernel"])
    model.post_init({"v_head.summary.bias": np.zeros(1)})
    np.testing.assert_array_equal(model.params["v_head"]["summary"]["kernel"], kernel)
    assert float(model.params["v_head"]["summary"]["bias"][0]) == 0.0
    with pytest.raises(CheckpointError, match=r"v_head.summary.weight has shape \(1, 3\).*takes \(1, 32\)"):
        model.post_init({"v_head.summary.bias": np.ones(1), "v_head.summary.weight": torch.zeros(1, 3)})
    assert float(model.params["v_head"]["summary"]["bias"][0]) == 0.0


def test_trl_class_attributes():
    for trlax_cls, trl_cls in ((FlaxAutoModelForCausalLMWithValueHead, AutoModelForCausalLMWithValueHead),
                               (FlaxAutoModelForSeq2SeqLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead)):
        assert trlax_cls.supported_modules == trl_cls.supported_modules
        assert trlax_cls.supported_rm_modules == trl_cls.supported_rm_modules
        assert trlax_cls.supported_args == tuple(trl_cls.supported_args)
        assert trlax_cls.transformers_parent_class.__name__ == "Flax" + trl_cls.transformers_parent_class.__name__
    trl_namings = AutoModelForSeq2SeqLMWithValueHead.lm_head_namings
    assert FlaxAutoModelForSeq2SeqLMWithValueHead.lm_head_namings == tuple(trl_namings)


def test_seq2seq_value_head_round_trip():
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ["t5"]()), std=0.1)
    model = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(pt, summary_dropout_prob=0.0)
    ids, mask = batch(VOCAB, "right", low=2)
    dec, dmask = batch(VOCAB, "none", seq_len=5, seed=1, low=2)
    out = model(ids, mask, decoder_input_ids=dec)
    back = model.to_torch()
    with torch.no_grad():
        ref = back(torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
    assert max_diff(ref[0], out[0]) < ATOL
    assert max_diff(ref[2], out[2]) < ATOL


def test_peft_model_becomes_a_lora_policy_and_back():
    import peft

    pt = _causal("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(pt, config)
    with torch.no_grad():  # a trained adapter: lora_B is zero at init
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.eval()
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(peft_model)
    assert model.is_peft_model
    ids, mask = batch(VOCAB, "right", low=2)
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(ref, model(ids, mask)[0], mask) < ATOL
    assert max_diff(plain, ref, mask) > 1e-3  # the adapter matters
    back = model.to_torch()
    assert back.is_peft_model
    trainable = {name for name, p in back.named_parameters() if p.requires_grad}  # as get_peft_model made it
    assert any("lora_B" in name for name in trainable) and all("lora_" in n or "v_head" in n for n in trainable)
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert max_diff(ref, again[0], mask) < ATOL
    assert max_diff(model(ids, mask)[2], again[2], mask) < ATOL


def test_trainable_lora_policy_converts_trainable():
    import peft

    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        _causal("llama"), peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    back = model.to_torch()
    trainable = {name for name, p in back.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "v_head" in name for name in trainable)
    assert any("lora_A" in name for name in trainable)


def test_peft_model_into_a_plain_lm_is_refused():
    import peft

    peft_model = peft.get_peft_model(_causal(), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(TrlaxError, match="merge_and_unload"):
        FlaxAutoModelForCausalLM.from_pretrained(peft_model)


def test_bf16_torch_model_keeps_its_dtype_with_auto():
    pt = _causal().to(torch.bfloat16)
    model = FlaxAutoModelForCausalLM.from_pretrained(pt, param_dtype="auto")
    leaf = model.params["transformer"]["wte"]["embedding"]
    assert leaf.dtype == np.dtype("bfloat16")
    assert model.storage_dtype == np.dtype("bfloat16")
    back = model.to_torch()
    assert next(back.parameters()).dtype == torch.bfloat16
    np.testing.assert_array_equal(back.transformer.wte.weight.detach().float().numpy(),
                                  pt.transformer.wte.weight.detach().float().numpy())


def test_to_torch_without_torch_names_torch(monkeypatch):
    model = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TrlaxError, match="needs torch"):
        model.to_torch()
