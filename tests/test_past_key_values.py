"""A forward that continues a KV cache: the LM's `cache` / `past_key_values` and TRL's `return_past_key_values`.

Every causal family's LM against transformers is in test_causal_parity.py; here the value-head wrappers
against TRL's, the seq2seq LMs' decoder cache against transformers, a LoRA policy and its reference, the
pure `apply` under jit, dtypes and the refusals.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    create_reference_model,
)
from trlax.errors import InputError, TrlaxTypeError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

VOCAB = 101
ATOL = 1e-4  # float32 on both sides; the differences seen are ~1e-6
PAST = 6


def _trl_pair(model_type: str) -> tuple[AutoModelForCausalLMWithValueHead, FlaxAutoModelForCausalLMWithValueHead]:
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[model_type]()), std=0.2)
    trl_model = AutoModelForCausalLMWithValueHead(pt, v_head_init_strategy="normal").eval()
    trl_model.is_peft_model = False  # what TRL's from_pretrained sets; its constructor does not
    return trl_model, FlaxAutoModelForCausalLMWithValueHead.from_pretrained(trl_model, strict=True)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_the_value_head_model_continues_its_cache_as_trl_does(model_type):
    trl_model, model = _trl_pair(model_type)
    ids, mask = batch(VOCAB, "left", seq_len=11)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 renames past_key_values to cache
        *_, past = trl_model(torch.tensor(ids[:, :PAST]), attention_mask=torch.tensor(mask[:, :PAST]),
                             return_past_key_values=True)
        ref = trl_model(torch.tensor(ids[:, PAST:]), past_key_values=past, attention_mask=torch.tensor(mask))
    first = model(ids[:, :PAST], mask[:, :PAST], return_past_key_values=True)
    assert len(first) == 4
    logits, loss, values = model(ids[:, PAST:], mask, past_key_values=first[3])
    new = mask[:, PAST:]
    assert max_diff(ref[0], logits, new) < ATOL
    assert max_diff(ref[2], values, new) < ATOL
    assert loss is None


def test_a_lora_policy_and_its_reference_continue_their_caches_like_one_forward():
    lm = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["llama"]())
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        lm, peft_config={"target_modules": ["q_proj", "v_proj"], "r": 4}, v_head_init_strategy="normal")
    policy.params = jax.tree_util.tree_map(lambda x: x + 0.05, policy.params)  # LoRA B is zero at init
    reference = create_reference_model(policy)
    ids, mask = batch(VOCAB, "right", seq_len=11)
    for model in (policy, reference):
        full_logits, _, full_values = model(ids, mask)
        *_, cache = model(ids[:, :PAST], mask[:, :PAST], return_past_key_values=True)
        logits, _, values, cache = model(ids[:, PAST:], mask, past_key_values=cache, return_past_key_values=True)
        new = mask[:, PAST:]
        assert max_diff(full_logits[:, PAST:], logits, new) < 1e-5
        assert max_diff(full_values[:, PAST:], values, new) < 1e-5
        assert cache[0]["k"].shape[2] == ids.shape[1]
    assert max_diff(policy(ids, mask)[0], reference(ids, mask)[0], mask) > 1e-3  # the adapter is on in one only


def test_the_pure_forward_takes_a_cache_under_jit_and_the_legacy_layout():
    model = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    ids, mask = batch(VOCAB, "left", seq_len=11)
    full = model(ids, mask).logits

    @jax.jit
    def continued(params, cache):
        return model.apply(params, ids[:, PAST:], mask, past_key_values=cache).logits

    cache = model(ids[:, :PAST], mask[:, :PAST], use_cache=True).past_key_values
    assert max_diff(full[:, PAST:], continued(model.params, cache), mask[:, PAST:]) < 1e-5
    legacy = tuple((layer["k"], layer["v"]) for layer in cache)  # transformers' ((k, v), ...) layout
    assert max_diff(full[:, PAST:], model(ids[:, PAST:], mask, past_key_values=legacy).logits, mask[:, PAST:]) < 1e-5


def test_a_cache_that_does_not_fit_is_refused_naming_the_fix():
    model = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    ids, mask = batch(VOCAB, "none", seq_len=11)
    cache = model(ids[:, :PAST], mask[:, :PAST], use_cache=True).cache
    rest = ids[:, PAST:]
    with pytest.raises(InputError, match="holds 1 layers; this model has 2"):
        model(rest, past_key_values=cache[:1])
    with pytest.raises(InputError, match=r"layer 1 v has the shape \(3, 4, 5, 8\)"):
        model(rest, past_key_values=[cache[0], {"k": cache[1]["k"], "v": cache[1]["v"][:, :, :5]}])
    with pytest.raises(InputError, match=r"this model and batch need .* = \(2, 4, 6, 8\)"):
        model(rest[:2], past_key_values=cache)
    with pytest.raises(InputError, match="must be the cache a forward with use_cache=True returned"):
        model(rest, past_key_values=[{"keys": 1}, {"keys": 1}])
    with pytest.raises(InputError, match=r"must cover the 6 cached tokens and the 5 new ones, \(3, 11\)"):
        model(rest, mask[:, PAST:], past_key_values=cache)
    with pytest.raises(TrlaxTypeError, match="pass the KV cache once"):
        model(rest, cache=cache, past_key_values=cache)
    as_torch = tuple((torch.tensor(np.asarray(layer["k"])), torch.tensor(np.asarray(layer["v"]))) for layer in cache)
    with pytest.raises(InputError, match=r"JAX or numpy arrays .* convert torch tensors with \.numpy\(\)"):
        model(rest, past_key_values=as_torch)
    # GPT-2's learned position table (64 rows) counts the cached tokens.
    long_cache = model(np.zeros((3, 60), np.int64), use_cache=True).cache
    with pytest.raises(InputError, match=r"has 64 positions; got a sequence of 65 tokens \(60 cached \+ 5 new\)"):
        model(rest, past_key_values=long_cache)
    with pytest.raises(InputError, match="must hold 4-D keys and values"):
        model(rest, past_key_values=[{"k": layer["k"][0], "v": layer["v"][0]} for layer in cache])


def test_a_cache_is_held_in_the_compute_dtype_whatever_dtype_comes_in():
    model = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["llama"]())
    ids, mask = batch(VOCAB, "left", seq_len=11)
    cache = model(ids[:, :PAST], mask[:, :PAST], use_cache=True).cache
    assert cache[0]["k"].dtype == jnp.float32
    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), cache)
    out = model(ids[:, PAST:], mask, cache=low)
    assert {layer["k"].dtype for layer in out.cache} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(out.cache[0]["k"][:, :, :PAST], low[0]["k"].astype(jnp.float32))
    half = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["llama"](), dtype=jnp.bfloat16)
    assert half(ids[:, PAST:], mask, cache=cache).cache[0]["k"].dtype == jnp.bfloat16


def test_the_value_head_model_takes_transformers_cache_keyword_too():
    lm = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm)
    ids, mask = batch(VOCAB, "none", seq_len=11)
    *_, cache = model(ids[:, :PAST], mask[:, :PAST], return_past_key_values=True)
    by_name = model(ids[:, PAST:], mask, cache=cache)
    np.testing.assert_array_equal(by_name[2], model(ids[:, PAST:], mask, past_key_values=cache)[2])
    with pytest.raises(TrlaxTypeError, match="pass the KV cache once"):
        model(ids[:, PAST:], mask, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("model_type", list(TINY_SEQ2SEQ))
def test_a_seq2seq_forward_continues_its_decoder_cache_as_transformers_does(model_type, tmp_path):
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ[model_type]()), std=0.2)
    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(save_torch(pt.eval(), tmp_path))
    ids, mask = batch(VOCAB, "left", seq_len=9, low=2)
    dec, dmask = batch(VOCAB, "right", seq_len=8, seed=1, low=2)
    t = torch.tensor
    with torch.no_grad():
        first = pt(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec[:, :5]),
                   decoder_attention_mask=t(dmask[:, :5]), use_cache=True)
        ref = pt(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec[:, 5:]),
                 decoder_attention_mask=t(dmask), cache=first.cache, use_cache=True)
    cache = model(ids, mask, decoder_input_ids=dec[:, :5], decoder_attention_mask=dmask[:, :5], use_cache=True).cache
    out = model(ids, mask, decoder_input_ids=dec[:, 5:], decoder_attention_mask=dmask, cache=cache)
    assert max_diff(ref.logits, out.logits, dmask[:, 5:]) < ATOL
    assert out.past_key_values is out.cache  # transformers' name
    geometry = model.spec.cache_geometry(model.config)
    assert [layer["k"].shape for layer in out.cache] == [(3, geometry.num_kv_heads, 8, geometry.head_dim)] * len(cache)


def test_the_seq2seq_value_head_model_continues_its_cache_as_trl_does():
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ["t5"]()), std=0.2)
    trl_model = AutoModelForSeq2SeqLMWithValueHead(pt, v_head_init_strategy="normal").eval()
    trl_model.is_peft_model = False
    model = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(trl_model, strict=True)
    ids, mask = batch(VOCAB, "none", seq_len=9, low=2)
    dec, dmask = batch(VOCAB, "right", seq_len=8, seed=1, low=2)
    t = torch.tensor
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.25 renames past_key_values to cache
        *_, past = trl_model(t(ids), attention_mask=t(mask), decoder_input_ids=t(dec[:, :5]),
                             decoder_attention_mask=t(dmask[:, :5]), return_past_key_values=True)
        ref = trl_model(t(ids), past_key_values=past, attention_mask=t(mask), decoder_input_ids=t(dec[:, 5:]),
                        decoder_attention_mask=t(dmask))
    *_, cache = model(ids, mask, decoder_input_ids=dec[:, :5], decoder_attention_mask=dmask[:, :5],
                      return_past_key_values=True)
    logits, _, values = model(ids, mask, decoder_input_ids=dec[:, 5:], decoder_attention_mask=dmask,
                              past_key_values=cache)
    assert max_diff(ref[0], logits, dmask[:, 5:]) < ATOL
    assert max_diff(ref[2], values, dmask[:, 5:]) < ATOL
    with pytest.raises(InputError, match=r"decoder_attention_mask must cover the 5 cached tokens"):
        model(ids, mask, decoder_input_ids=dec[:, 5:], decoder_attention_mask=dmask[:, 5:], past_key_values=cache)
