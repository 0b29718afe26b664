"""generate as a transformers / TRL user calls it: GenerationConfig, the checkpoint's
generation_config.json, min_new_tokens, repetition_penalty, seq2seq decoder prompts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead, FlaxAutoModelForSeq2SeqLM
from trlax.errors import UnsupportedModelError
from trlax.generation import GenerateOutput

VOCAB = 101


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A random GPT-2 (PyTorch) whose eos is a likely token, saved with a generation_config.json, and trlax's load."""
    config = TINY_CAUSAL["gpt2"]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    folder = tmp_path_factory.mktemp("gpt2")
    pt.generation_config = transformers.GenerationConfig(eos_token_id=13, pad_token_id=1, max_new_tokens=7)
    save_torch(pt, folder)
    return pt, FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder, summary_dropout_prob=0.0)


def _torch_generate(pt, ids, mask, width=None, pad=1, **kwargs):
    """transformers' greedy output, padded to `width` (it stops early once every row has its eos; trlax's
    output keeps its static shape, filled with pad)."""
    with torch.no_grad():
        out = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, **kwargs).numpy()
    width = width or out.shape[1]
    return np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=pad)


def test_checkpoint_generation_config_is_the_default(gpt2_pair):
    pt, model = gpt2_pair
    assert model.pretrained_model.generation_config.max_new_tokens == 7
    ids, mask = batch(VOCAB, "left", low=2)
    out = model.generate(ids, mask)
    assert isinstance(out, GenerateOutput)
    # transformers reads the same file: eos 13, pad 1, 7 new tokens.
    ref = _torch_generate(pt, ids, mask, out.sequences.shape[1])
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert np.any(ref[:, ids.shape[1]:] == 13)  # the eos rule is exercised


def test_generation_config_argument_and_kwargs_override(gpt2_pair):
    pt, model = gpt2_pair
    ids, mask = batch(VOCAB, "left", low=2)
    config = transformers.GenerationConfig(max_new_tokens=9, eos_token_id=[], pad_token_id=0)
    out = model.generate(ids, mask, generation_config=config)
    assert out.sequences.shape == (3, ids.shape[1] + 9)
    np.testing.assert_array_equal(np.asarray(out.sequences), _torch_generate(pt, ids, mask, generation_config=config))
    short = model.generate(ids, mask, generation_config=config, max_new_tokens=4, return_dict_in_generate=False)
    assert isinstance(short, jax.Array) and short.shape == (3, ids.shape[1] + 4)
    # max_length counts the prompt, as in transformers (where no max_new_tokens is set).
    model.pretrained_model.generation_config.max_new_tokens = None
    try:
        long = model.generate(ids, mask, generation_config=transformers.GenerationConfig(max_length=ids.shape[1] + 3))
    finally:
        model.pretrained_model.generation_config.max_new_tokens = 7
    assert long.sequences.shape == (3, ids.shape[1] + 3)


@pytest.mark.parametrize("settings", [
    {"min_new_tokens": 5},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.7, "min_new_tokens": 3},
    {"min_length": 14},
])
def test_processors_match_transformers_greedy(gpt2_pair, settings):
    pt, model = gpt2_pair
    changed = False
    for padding, seed in (("left", 0), ("none", 0), ("right", 3)):
        ids, mask = batch(VOCAB, padding, low=2, seed=seed)
        if padding == "right":  # generation needs left padding: a batch of one full row
            ids, mask = ids[:1], mask[:1]
        config = transformers.GenerationConfig(max_new_tokens=8, eos_token_id=13, pad_token_id=1, **settings)
        out = np.asarray(model.generate(ids, mask, generation_config=config, return_dict_in_generate=False))
        ref = _torch_generate(pt, ids, mask, out.shape[1], generation_config=config)
        np.testing.assert_array_equal(out, ref)
        plain = np.asarray(model.generate(ids, mask, max_new_tokens=8, eos_token_id=13).sequences)
        changed |= not np.array_equal(plain, out)
    assert changed  # the processor changed some tokens


def test_trl_ppo_generation_kwargs_are_accepted(gpt2_pair):
    """TRL's PPO passes top_k=0.0 (a float) and min_length=-1."""
    _, model = gpt2_pair
    ids, mask = batch(VOCAB, "left", low=2)
    kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True, "pad_token_id": 1,
              "max_new_tokens": 4}
    out = model.generate(ids, mask, prng_key=jax.random.key(0), **kwargs)
    assert out.sequences.shape == (3, ids.shape[1] + 4)


@pytest.mark.parametrize("field", [{"num_beams": 4}, {"no_repeat_ngram_size": 2}, {"output_scores": True},
                                   {"num_return_sequences": 2, "do_sample": True}, {"typical_p": 0.5}])
def test_unsupported_fields_raise_naming_them(gpt2_pair, field):
    _, model = gpt2_pair
    ids, mask = batch(VOCAB, "left", low=2)
    name = next(iter(field))
    with pytest.raises(UnsupportedModelError, match=name):
        model.generate(ids, mask, generation_config=transformers.GenerationConfig(**field))
    with pytest.raises(UnsupportedModelError, match=name):
        model.generate(ids, mask, **field)


def test_no_generation_config_keeps_trlax_defaults(tmp_path):
    model = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    assert model.generation_config is None
    ids, _ = batch(VOCAB, "none")
    assert model.generate(ids).sequences.shape == (3, ids.shape[1] + 32)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()


def test_generation_config_round_trips_through_save(gpt2_pair, tmp_path):
    _, model = gpt2_pair
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 7 and saved["eos_token_id"] == 13
    assert transformers.GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 7


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_seq2seq_continues_a_decoder_prompt(tmp_path, model_type):
    config = TINY_SEQ2SEQ[model_type]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(config), std=0.1)
    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(save_torch(pt, tmp_path))
    ids, mask = batch(VOCAB, "right", low=3)
    start = config.decoder_start_token_id
    with_start = np.array([[start, 5, 6, 7], [start, 8, 9, 10], [start, 11, 12, 13]])
    for prompt in (with_start, with_start[:, 1:]):  # without the start token, it is put in front
        out = model.generate(ids, mask, decoder_input_ids=prompt, max_new_tokens=5, eos_token_id=[])
        with torch.no_grad():  # transformers v5's T5 cache breaks on decoder prompts; without it the math is the same
            ref = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                              decoder_input_ids=torch.tensor(prompt), max_new_tokens=5, do_sample=False,
                              use_cache=False, eos_token_id=None).numpy()
        np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    penalised = model.generate(ids, mask, decoder_input_ids=with_start, max_new_tokens=5, eos_token_id=[],
                               repetition_penalty=1.4)
    with torch.no_grad():
        ref = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          decoder_input_ids=torch.tensor(with_start), max_new_tokens=5, do_sample=False,
                          use_cache=False, eos_token_id=None,
                          repetition_penalty=1.4).numpy()
    np.testing.assert_array_equal(np.asarray(penalised.sequences), ref)
