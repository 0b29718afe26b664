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
from trlax.errors import TrlaxTypeError, UnsupportedModelError
from trlax.generation import GenerateOutput
from trlax.inputs import InputError

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
    {"min_length": 14, "min_new_tokens": 1},  # min_new_tokens takes precedence, as transformers has it
    {"forced_eos_token_id": 20},
    {"forced_eos_token_id": [20, 30], "min_new_tokens": 2},
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
                                   {"num_return_sequences": 2, "do_sample": True}, {"typical_p": 0.5},
                                   {"bad_words_ids": []}, {"sequence_bias": {}}])  # transformers refuses these two
def test_unsupported_fields_raise_naming_them(gpt2_pair, field):
    _, model = gpt2_pair
    ids, mask = batch(VOCAB, "left", low=2)
    name = next(iter(field))
    with pytest.raises(UnsupportedModelError, match=name):
        model.generate(ids, mask, generation_config=transformers.GenerationConfig(**field))
    with pytest.raises(UnsupportedModelError, match=name):
        model.generate(ids, mask, **field)


def test_custom_entries_of_a_generation_config_are_ignored_as_transformers_does(tmp_path):
    """transformers keeps a GenerationConfig's custom entries (a checkpoint's `user_token_id`, ...) and never
    reads them; trlax refused them as unimplemented settings, so such a checkpoint could not generate."""
    config = TINY_CAUSAL["gpt2"]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    pt.generation_config = transformers.GenerationConfig(eos_token_id=13, pad_token_id=1, max_new_tokens=5)
    pt.generation_config.user_token_id = 7
    save_torch(pt, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["user_token_id"] == 7
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch(VOCAB, "left", low=2)
    out = np.asarray(model.generate(ids, mask).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, out.shape[1]))
    passed = transformers.GenerationConfig(max_new_tokens=4, eos_token_id=[], assistant_token_id=3)
    out = np.asarray(model.generate(ids, mask, generation_config=passed).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, generation_config=passed))
    with pytest.raises(TrlaxTypeError, match="unknown keyword argument"):  # a keyword is no config entry
        model.generate(ids, mask, user_token_id=7)
    with pytest.raises(UnsupportedModelError, match="max_new_token=5"):  # a typo in a dict stays an error
        model.generate(ids, mask, generation_config={"max_new_token": 5})


def test_the_prompt_may_be_passed_as_transformers_inputs(gpt2_pair):
    _, model = gpt2_pair
    ids, mask = batch(VOCAB, "left", low=2)
    want = np.asarray(model.generate(ids, mask).sequences)
    np.testing.assert_array_equal(np.asarray(model.generate(inputs=ids, attention_mask=mask).sequences), want)
    np.testing.assert_array_equal(np.asarray(model.pretrained_model.generate(inputs=ids, attention_mask=mask)
                                             .sequences), want)
    with pytest.raises(TrlaxTypeError, match="prompt twice"):
        model.generate(ids, mask, inputs=ids)
    with pytest.raises(TrlaxTypeError, match="needs the prompt"):
        model.generate(attention_mask=mask)


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


def _folder_pair(folder, generation_config=None, **config_fields):
    """A random GPT-2 saved with these config.json fields and generation_config.json (None: no file), and
    both frameworks' loads of the folder."""
    config = TINY_CAUSAL["gpt2"]()
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    save_torch(pt, folder)
    (folder / "generation_config.json").unlink()
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config_fields}))
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), FlaxAutoModelForCausalLM.from_pretrained(
        folder)


def test_config_json_generation_fields_apply_without_a_generation_config(tmp_path):
    """An older checkpoint's config.json generation fields: transformers builds its generation config from
    them when generation_config.json is missing; trlax applies them (or refuses what it lacks)."""
    pt, model = _folder_pair(tmp_path / "penalty", repetition_penalty=1.8)
    assert pt.generation_config.repetition_penalty == model.generation_config.repetition_penalty == 1.8
    ids, mask = batch(VOCAB, "left", low=2)
    out = np.asarray(model.generate(ids, mask, max_new_tokens=8, eos_token_id=None).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, max_new_tokens=8, eos_token_id=None))
    _, model = _folder_pair(tmp_path / "ngram", no_repeat_ngram_size=2)
    with pytest.raises(UnsupportedModelError, match="no_repeat_ngram_size=2"):
        model.generate(ids, mask)


def test_pad_falls_back_to_eos_not_to_config_json(tmp_path):
    """generation_config.json with eos but no pad: finished rows emit the first eos (transformers' rule),
    not config.json's pad_token_id (1)."""
    pt, model = _folder_pair(tmp_path, {"eos_token_id": [13, 20], "max_new_tokens": 8})
    ids, mask = batch(VOCAB, "left", low=2)
    out = np.asarray(model.generate(ids, mask).sequences)
    ref = _torch_generate(pt, ids, mask, out.shape[1], pad=13)
    np.testing.assert_array_equal(out, ref)
    finished = [row for row in out[:, ids.shape[1]:] if np.isin(row[:-1], (13, 20)).any()]
    assert finished and all(1 not in row for row in finished)


def test_none_arguments_unset_the_checkpoint_settings(gpt2_pair):
    pt, model = gpt2_pair  # checkpoint: eos 13, 7 new tokens
    ids, mask = batch(VOCAB, "left", low=2)
    out = np.asarray(model.generate(ids, mask, eos_token_id=None).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, eos_token_id=None))
    assert out.shape[1] == ids.shape[1] + 7 and np.asarray(model.generate(ids, mask).sequences).tolist() != out.tolist()


def test_attention_mask_is_inferred_from_pad_as_transformers_does(gpt2_pair):
    pt, model = gpt2_pair  # pad 1, eos 13
    ids, mask = batch(VOCAB, "left", low=2)
    ids[mask == 0] = 1
    inferred = np.asarray(model.generate(ids).sequences)
    np.testing.assert_array_equal(inferred, np.asarray(model.generate(ids, mask).sequences))
    with torch.no_grad():
        ref = pt.generate(torch.tensor(ids), do_sample=False).numpy()
    np.testing.assert_array_equal(inferred, np.pad(ref, ((0, 0), (0, inferred.shape[1] - ref.shape[1])),
                                                   constant_values=1))
    # pad == eos: nothing can be inferred (a pad may be a real eos), the mask is all ones.
    ones = np.asarray(model.generate(ids, pad_token_id=13).sequences)
    np.testing.assert_array_equal(ones, np.asarray(model.generate(ids, np.ones_like(mask), pad_token_id=13).sequences))
    # A row ending in the pad id (right padding) keeps the all-ones mask: causal prompts must end in a token.
    ids[0, -1] = 1
    np.testing.assert_array_equal(np.asarray(model.generate(ids).sequences),
                                  np.asarray(model.generate(ids, np.ones_like(mask)).sequences))


def test_the_attention_mask_is_inferred_under_jit_too(gpt2_pair):
    """Traced input_ids got no inferred mask (every pad attended to: other tokens than the eager call's)."""
    _, model = gpt2_pair  # pad 1, eos 13
    ids, mask = batch(VOCAB, "left", low=2)
    ids[mask == 0] = 1
    eager = np.asarray(model.generate(ids).sequences)
    np.testing.assert_array_equal(jax.jit(lambda i: model.generate(i).sequences)(ids), eager)
    ids[0, -1] = 1  # a row ending in the pad id: all ones, as the eager call
    np.testing.assert_array_equal(jax.jit(lambda i: model.generate(i).sequences)(ids),
                                  np.asarray(model.generate(ids, np.ones_like(mask)).sequences))


def test_generation_may_fill_every_learned_position(gpt2_pair):
    """The last new token is never fed back, so prompt + max_new_tokens may be one more than the positions."""
    pt, model = gpt2_pair  # 64 learned positions
    ids, mask = batch(VOCAB, "left", low=2)
    new = 64 - ids.shape[1] + 1
    out = np.asarray(model.generate(ids, mask, max_new_tokens=new, eos_token_id=None).sequences)
    np.testing.assert_array_equal(out, _torch_generate(pt, ids, mask, max_new_tokens=new, eos_token_id=None))


@pytest.fixture(scope="module")
def seq2seq_pairs(tmp_path_factory):
    """(transformers, trlax) of a random T5 and BART."""
    pairs = {}
    for model_type in ("t5", "bart"):
        torch.manual_seed(0)
        pt = torch_random_init(transformers.AutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ[model_type]()), std=0.1)
        pairs[model_type] = (pt.eval(), FlaxAutoModelForSeq2SeqLM.from_pretrained(
            save_torch(pt, tmp_path_factory.mktemp(model_type))))
    return pairs


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_left_padded_decoder_positions_match_transformers(seq2seq_pairs, model_type):
    """A left-pad decoder query sees no key: BART's SDPA outputs zeros there, T5's SDPA (handed its position bias
    as a float mask) the values' average; trlax averaged for both (BART matched), then zeroed for both (T5 off by
    up to 14 at pad positions). Every position matches now, real ones as before."""
    pt, model = seq2seq_pairs[model_type]
    ids, mask = np.array([[3, 4, 5, 6, 7]] * 2), np.array([[0, 0, 1, 1, 1], [1] * 5])
    dec, dmask = np.array([[0, 0, 0, 5, 6], [0, 5, 6, 7, 8]]), np.array([[0, 0, 1, 1, 1], [1] * 5])
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(dmask)).logits.numpy()
    out = model(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_seq2seq_without_a_mask_attends_to_every_encoder_token(seq2seq_pairs, model_type):
    """transformers 5 infers no attention mask for an encoder-decoder (trlax masked the pads)."""
    pt, model = seq2seq_pairs[model_type]
    ids, mask = batch(VOCAB, "right", low=3)
    ids = np.where(mask == 1, ids, pt.config.pad_token_id)
    out = np.asarray(model.generate(ids, max_new_tokens=5, eos_token_id=[]).sequences)
    with torch.no_grad():
        ref = pt.generate(torch.tensor(ids), max_new_tokens=5, do_sample=False, use_cache=False,
                          eos_token_id=None).numpy()
    np.testing.assert_array_equal(out, ref)
    masked = np.asarray(model.generate(ids, mask, max_new_tokens=5, eos_token_id=[]).sequences)
    assert (masked != out).any()  # the pads change the result


def test_seq2seq_max_length_counts_the_start_token_the_settings_name(seq2seq_pairs):
    """max_length counts the decoder prompt with the start token generate puts in front: the one the call
    names, not the config's (trlax's width was one off either way)."""
    pt, model = seq2seq_pairs["bart"]
    ids, mask = batch(VOCAB, "none", low=3)
    config_start = pt.config.decoder_start_token_id
    for start, prompt in ((5, [5, 6, 7]), (7, [config_start, 5, 6, 7])):
        prompt = np.array([prompt] * ids.shape[0])
        out = np.asarray(model.generate(ids, mask, decoder_input_ids=prompt, decoder_start_token_id=start,
                                        max_length=8, eos_token_id=[]).sequences)
        with torch.no_grad():
            ref = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                              decoder_input_ids=torch.tensor(prompt), decoder_start_token_id=start, max_length=8,
                              do_sample=False, use_cache=False, eos_token_id=None, forced_eos_token_id=None).numpy()
        assert out.shape == ref.shape == (ids.shape[0], 8)


def test_seq2seq_start_token_falls_back_to_the_settings_bos(seq2seq_pairs, tmp_path):
    """generation_config.json with bos but no decoder_start_token_id: transformers starts the decoder with that bos;
    trlax took config.json's decoder_start_token_id, and every generated token differed."""
    pt, _ = seq2seq_pairs["bart"]
    folder = save_torch(pt, tmp_path / "bart")
    bos = 4
    assert pt.config.decoder_start_token_id != bos
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": 2,
                                                              "pad_token_id": 1}))
    model = FlaxAutoModelForSeq2SeqLM.from_pretrained(folder)
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    ids, mask = batch(VOCAB, "right", low=3)
    out = np.asarray(model.generate(ids, mask, max_new_tokens=6).sequences)
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                 do_sample=False, use_cache=False).numpy()
    assert (out[:, 0] == bos).all()
    np.testing.assert_array_equal(out, ref)


def test_bart_decoder_prompt_may_fill_every_position(seq2seq_pairs):
    """A decoder prompt that starts with the start token gets none added: it may fill the position table."""
    pt, model = seq2seq_pairs["bart"]
    ids, mask = batch(VOCAB, "none", low=3)
    limit = pt.config.max_position_embeddings
    prompt = np.array([[pt.config.decoder_start_token_id, 5, 6, 7]] * ids.shape[0])
    out = model.generate(ids, mask, decoder_input_ids=prompt, max_new_tokens=limit - 3, eos_token_id=[])
    assert out.sequences.shape == (ids.shape[0], limit + 1)
    with pytest.raises(InputError, match=f"decoder prompt length 4 \\+ max_new_tokens - 1 = {limit + 1} exceeds"):
        model.generate(ids, mask, decoder_input_ids=prompt, max_new_tokens=limit - 2, eos_token_id=[])


@pytest.mark.parametrize("bad", [VOCAB, -3])
def test_decoder_prompt_ids_outside_the_vocabulary_are_refused(seq2seq_pairs, bad):
    _, model = seq2seq_pairs["t5"]
    ids, mask = batch(VOCAB, "none", low=3)
    prompt = np.full((ids.shape[0], 2), bad)
    with pytest.raises(InputError, match="decoder_input_ids"):
        model.generate(ids, mask, decoder_input_ids=prompt, max_new_tokens=3)


@pytest.mark.parametrize(("setting", "match"), [
    ({"temperature": np.float32(0.0)}, "temperature must be > 0"),
    ({"temperature": np.float32(-1.0)}, "temperature must be > 0"),
    # > 0 as a Python float, 0 in the float32 division XLA runs (subnormals flushed): every token was the last id.
    ({"temperature": 1e-40}, "at least 1.2e-38"),
    ({"temperature": 1e-46}, "at least 1.2e-38"),
    ({"top_p": np.float64(1.5)}, "top_p must be in"),
    ({"repetition_penalty": np.float32(0.0)}, "repetition_penalty must be > 0"),
    ({"repetition_penalty": np.array(-2.0)}, "repetition_penalty must be > 0"),
])
def test_numpy_scalar_settings_are_checked_like_python_numbers(gpt2_pair, setting, match):
    _, model = gpt2_pair
    ids, _ = batch(VOCAB, "none")
    with pytest.raises(InputError, match=match):
        model.generate(ids, do_sample=True, prng_key=jax.random.key(0), max_new_tokens=2, **setting)


def test_model_inputs_typos_and_no_op_values(gpt2_pair):
    """An array model input is refused by name (it crashed inside numpy), a typo is an error (it passed when
    False), values transformers treats as off pass, a 0-d eos id works."""
    _, model = gpt2_pair
    ids, _ = batch(VOCAB, "none")
    shape = rf"\({ids.shape[0]}, {ids.shape[1]}\)"
    with pytest.raises(UnsupportedModelError, match=rf"token_type_ids=<array of shape {shape}>"):
        model.generate(ids, token_type_ids=np.zeros_like(ids), max_new_tokens=2)
    with pytest.raises(TrlaxTypeError, match=r"unknown keyword argument\(s\) \['do_smaple'\]"):
        model.generate(ids, do_smaple=False, max_new_tokens=2)
    out = model.generate(ids, min_p=0.0, guidance_scale=1.0, eos_token_id=np.array(5), max_new_tokens=2)
    assert out.sequences.shape == (3, ids.shape[1] + 2)
