"""Bad inputs fail loudly (issue 14, items 4, 5 and the error hierarchy of 8).

Out-of-range token ids and positions past a learned position table raise InputError before
any compute (JAX would give NaN logits or wrap -1 to the last row); params of another model
raise naming the first mismatched path; every input error trlax raises is a TrlaxError that
keeps its standard base (ValueError, TypeError).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import trlax
from tests.tiny_configs import gpt2, llama
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    TrlaxError,
    create_reference_model,
)
from trlax.errors import TrlaxTypeError, UnsupportedModelError
from trlax.inputs import InputError, checked

VOCAB = 101  # the tiny configs' vocabulary
IDS = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)


@pytest.fixture(scope="module")
def lm() -> FlaxAutoModelForCausalLM:
    return FlaxAutoModelForCausalLM.from_config(gpt2())  # 64 learned positions


@pytest.fixture(scope="module")
def wrapper(lm) -> FlaxAutoModelForCausalLMWithValueHead:
    return FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, summary_dropout_prob=0.0)


@pytest.fixture(scope="module")
def other_params() -> dict:
    """The params of a 3-layer GPT-2 (the fixtures' model has 2)."""
    config = gpt2()
    config.n_layer = 3
    return FlaxAutoModelForCausalLM.from_config(config).params


@pytest.fixture(scope="module")
def bart() -> FlaxAutoModelForSeq2SeqLM:
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                     decoder_ffn_dim=37, max_position_embeddings=16, dropout=0.0,
                                     decoder_start_token_id=2)
    return FlaxAutoModelForSeq2SeqLM.from_config(config)


# --- token ids ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1])
def test_out_of_vocabulary_ids_raise_in_every_forward(lm, wrapper, bad):
    ids = IDS.copy()
    ids[1, 2] = bad
    message = rf"input_ids holds token id {bad}, outside the vocabulary \[0, {VOCAB}\)"
    with pytest.raises(InputError, match=message):
        lm(ids)
    with pytest.raises(ValueError, match=message):  # InputError is a ValueError, as before
        wrapper(ids)
    with pytest.raises(InputError, match=message):
        lm.apply(lm.params, jnp.asarray(ids), jnp.ones_like(ids))  # eager apply: concrete ids
    with pytest.raises(InputError, match=message):
        lm.generate(ids, max_new_tokens=2)
    with pytest.raises(InputError, match=message):
        wrapper.generate(ids, max_new_tokens=2)
    with pytest.raises(trlax.InputError, match=message):  # README's name for it (not exported before)
        lm(ids)


@pytest.mark.parametrize("mask", [np.array([[1, 1, 2, 1]] * 2), np.array([[0.5, 1.0, 1.0, 1.0]] * 2)])
def test_attention_masks_other_than_zeros_and_ones_raise(lm, wrapper, bart, mask):
    """A mask holding 2 or 0.5 was cast to int32 and used: 2 counted twice in the positions a mask gives
    (generate, OPT), 0.5 became padding, and generate blamed the padding side."""
    calls = [lambda: lm(IDS, attention_mask=mask), lambda: wrapper(IDS, attention_mask=mask),
             lambda: lm.generate(IDS, attention_mask=mask, max_new_tokens=2),
             lambda: bart(IDS, attention_mask=mask, decoder_input_ids=IDS),
             lambda: bart(IDS, decoder_input_ids=IDS, decoder_attention_mask=mask)]
    for call in calls:
        with pytest.raises(InputError, match="mask must hold only 1 \\(a token\\) and 0 \\(padding\\); got the "
                                             f"values \\[{np.unique(mask)[0]}"):
            call()
    lm(IDS, attention_mask=np.array([[False, True, True, True]] * 2))  # bool and float 0/1 masks are fine
    wrapper(IDS, attention_mask=np.array([[0.0, 1.0, 1.0, 1.0]] * 2))


def test_empty_batches_and_sequences_raise(lm, wrapper, bart):
    """[B, 0] ids gave a raw ZeroDivisionError (rotary families) or empty outputs (GPT-2)."""
    llama_lm = FlaxAutoModelForCausalLM.from_config(llama())
    for call in (lambda x: lm(x), lambda x: wrapper(x), lambda x: llama_lm(x), lambda x: bart(x, decoder_input_ids=x),
                 lambda x: lm.generate(x, max_new_tokens=2)):
        for empty in (np.zeros((2, 0), np.int32), np.zeros((0, 4), np.int32)):
            with pytest.raises(InputError, match=re.escape(f"has shape {empty.shape}: it needs at least one row")):
                call(empty)


def test_the_pure_forwards_check_shapes_as_the_calls_do(lm, wrapper, bart):
    """`apply` (what a jitted train step calls) broadcast [B, 1] labels and masks: a wrong loss (labels [3, 1] on T5
    gave 32.6 where torch raises) or wrong logits, silently; a seq2seq wrapper's call with decoder ids of another
    batch size gave a raw reshape TypeError. Shapes are static, so the checks hold under jit too."""
    ids = jnp.asarray(IDS)
    ones, narrow = jnp.ones_like(ids), jnp.ones((2, 1), jnp.int32)
    seq2seq = FlaxAutoModelForSeq2SeqLMWithValueHead.from_pretrained(bart, summary_dropout_prob=0.0)
    cases = {
        "labels must have the shape of its ids \\(2, 4\\); got \\(2, 1\\)": [
            lambda: lm.apply(lm.params, ids, ones, labels=narrow),
            lambda: jax.jit(lambda p: wrapper.apply(p, ids, ones, labels=narrow))(wrapper.params),
            lambda: bart.apply(bart.params, ids, ones, ids, labels=narrow),
            lambda: seq2seq.apply(seq2seq.params, ids, ones, ids, ones, labels=narrow)],
        "attention_mask must have the shape of its ids": [
            lambda: lm.apply(lm.params, ids, narrow),
            lambda: jax.jit(lambda p: bart.apply(p, ids, narrow, ids))(bart.params)],
        "decoder_attention_mask must have the shape of its ids": [
            lambda: seq2seq.apply(seq2seq.params, ids, ones, ids, narrow)],
        "position_ids must have the shape of its ids": [lambda: lm.apply(lm.params, ids, ones, narrow)],
        "decoder_input_ids has batch size 1 but input_ids has 2": [
            lambda: seq2seq(ids, decoder_input_ids=ids[:1]),
            lambda: bart.apply(bart.params, ids, ones, ids[:1])],
    }
    for message, calls in cases.items():
        for call in calls:
            with pytest.raises(InputError, match=message):
                call()


@pytest.mark.parametrize("dtype", ["int8", jnp.int32, np.dtype("bool"), "auto"])
def test_non_float_model_dtypes_raise(dtype, tmp_path):
    """dtype=int8 failed deep in Flax or jax.nn ('Dtype must be inexact', 'logistic does not accept dtype int8')
    after reading the config; transformers refuses it up front too."""
    for kwargs in ({"dtype": dtype}, {"param_dtype": dtype}):
        if dtype == "auto":  # from_pretrained reads "auto" from the checkpoint; from_config has nothing to read
            with pytest.raises(UnsupportedModelError, match=f"{next(iter(kwargs))}=auto is not a floating-point"):
                FlaxAutoModelForCausalLM.from_config(llama(), **kwargs)
            continue
        with pytest.raises(UnsupportedModelError, match="is not a floating-point dtype.*float32, bfloat16"):
            FlaxAutoModelForCausalLM.from_config(llama(), **kwargs)
    FlaxAutoModelForCausalLM.from_config(gpt2()).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="is not a floating-point dtype"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, dtype="int8")


def test_float_dtypes_models_cannot_hold_are_refused(tmp_path):
    """float8 compute was accepted (transformers refuses it), float64 quietly held float32 (JAX without x64)."""
    for dtype in (jnp.float8_e4m3fn, "float8_e5m2", jnp.float64):
        for name in ("dtype", "param_dtype"):
            with pytest.raises(UnsupportedModelError, match=f"{name}=float.*: trlax models compute and hold params in "
                                                            "float32, bfloat16 or float16"):
                FlaxAutoModelForCausalLM.from_config(gpt2(), **{name: dtype})
    # "auto" on a float64 checkpoint means what JAX holds of it, float32, as it loaded before
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(gpt2()).to(torch.float64).save_pretrained(tmp_path)
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto", param_dtype="auto")
    assert model.dtype == jnp.float32 and model.param_dtype == jnp.float32
    # saving "auto" still writes the checkpoint's own dtype, as the default save does
    model.save_pretrained(tmp_path / "back", dtype="auto")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "float64"


def test_ids_past_int32_and_ragged_rows_raise(lm):
    """An id of 2**32 + 7 was cast to int32 before the range check and ran as token 7; ragged rows were numpy's
    ValueError."""
    ids = IDS.astype(np.int64)
    ids[0, 1] = 2**32 + 7
    with pytest.raises(InputError, match="input_ids holds token id 4294967303, which no vocabulary reaches"):
        lm(ids)
    with pytest.raises(InputError, match="its rows have different lengths: pad them"):
        lm([[1, 2, 3], [4, 5]])


def test_in_range_ids_still_run(lm, wrapper):
    ids = np.array([[0, VOCAB - 1]], np.int32)
    assert np.isfinite(np.asarray(lm(ids).logits)).all()
    _, _, values = wrapper(ids)
    assert np.isfinite(np.asarray(values)).all()


def test_seq2seq_encoder_and_decoder_ids_are_checked(bart):
    decoder = np.array([[2, 5]], np.int32)
    with pytest.raises(InputError, match="input_ids holds token id 101"):
        bart(np.array([[4, VOCAB]]), decoder_input_ids=decoder)
    with pytest.raises(InputError, match="decoder_input_ids holds token id -3"):
        bart(np.array([[4, 5]]), decoder_input_ids=np.array([[2, -3]]))
    with pytest.raises(InputError, match="decoder_start_token_id holds token id 500"):
        bart.generate(np.array([[4, 5]]), max_new_tokens=2, decoder_start_token_id=500)
    assert bart.generate(np.array([[4, 5]]), max_new_tokens=2).sequences.shape == (1, 3)


# --- positions ------------------------------------------------------------------------------
def test_sequences_past_a_learned_position_table_raise(lm, wrapper):
    ids = np.ones((1, 70), np.int32)  # GPT-2 here has 64 positions
    with pytest.raises(InputError, match="input_ids: GPT2 has 64 positions; got a sequence of 70 tokens"):
        lm(ids)
    with pytest.raises(InputError, match="GPT2 has 64 positions"):
        wrapper(ids)
    with pytest.raises(InputError, match="GPT2 has 64 positions"):
        jax.jit(lm.apply)(lm.params, jnp.asarray(ids), jnp.ones_like(ids))  # a shape: checked under jit too


def test_a_batch_padded_wider_than_the_table_runs_when_its_positions_fit(lm):
    """transformers takes explicit position_ids that fit the table whatever the padded width; trlax refused any
    sequence longer than the table (a reward model scoring left-padded prompts + replies was refused)."""
    ids = np.ones((1, 70), np.int32)
    ids[0, 60:] = np.arange(2, 12)
    mask = (np.arange(70) >= 60).astype(np.int32)[None]
    out = np.asarray(lm(ids, mask, position_ids=np.maximum(np.cumsum(mask, axis=1) - 1, 0)).logits)
    np.testing.assert_allclose(out[:, 60:], np.asarray(lm(ids[:, 60:]).logits), atol=1e-5)


def test_explicit_positions_past_the_table_raise(lm):
    mask = np.ones_like(IDS)
    with pytest.raises(InputError, match="position_ids holds position 64"):
        lm(IDS, mask, position_ids=np.array([[0, 1, 2, 64], [0, 1, 2, 3]]))
    with pytest.raises(InputError, match="position -1 at a real"):
        lm(IDS, mask, position_ids=np.array([[-1, 0, 1, 2], [0, 1, 2, 3]]))
    # cumsum(mask) - 1 gives -1 at left padding: a masked slot, allowed (it reads a finite row).
    left = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = lm(IDS, left, position_ids=np.cumsum(left, axis=1) - 1)
    assert np.isfinite(np.asarray(out.logits)[left.astype(bool)]).all()


def test_rotary_models_have_no_hard_position_limit():
    model = FlaxAutoModelForCausalLM.from_config(llama())  # max_position_embeddings 64, rotary
    logits = np.asarray(model(np.ones((1, 70), np.int32)).logits)
    assert np.isfinite(logits).all()


def test_generate_checks_prompt_plus_new_tokens_against_the_positions(lm):
    with pytest.raises(InputError, match="prompt length 60 \\+ max_new_tokens - 1 = 69 exceeds the model's 64"):
        lm.generate(np.ones((1, 60), np.int32), max_new_tokens=10)
    # The last new token is never fed back: 60 + 5 tokens need 64 positions, as transformers counts them.
    prompt = np.full((1, 60), 2, np.int32)  # not the pad id (1), which would count as padding here
    assert lm.generate(prompt, max_new_tokens=5, eos_token_id=[]).sequences.shape == (1, 65)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "prng_key": jax.random.key(0)}])
def test_generate_refuses_to_choose_tokens_from_nan_logits(lm, bart, sampling):
    """Non-finite params (a diverged update) gave NaN logits, from which argmax and the draw picked the last id."""
    def poisoned(params: dict) -> dict:
        return jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.full_like(leaf, jnp.nan) if "ln_f" in
                                                jax.tree_util.keystr(path) or "layernorm_embedding" in
                                                jax.tree_util.keystr(path) else leaf, params)

    for model in (lm, bart):
        with pytest.raises(InputError, match="logits hold NaN or inf"):
            model.generate(IDS, params=poisoned(model.params), max_new_tokens=3, **sampling)
        assert model.generate(IDS, max_new_tokens=3, **sampling).sequences.shape[0] == 2  # finite params run


def test_transformers_forward_arguments_trlax_lacks_are_named(lm, wrapper, bart):
    """encoder_outputs=, output_attentions=, a typo: Python's bare "unexpected keyword argument" TypeError. TRL's
    causal forward takes output_hidden_states (it sets it itself): the wrapper raised on it."""
    logits, _, values = wrapper(IDS, output_hidden_states=True)
    assert values.shape == IDS.shape
    for model, name, hint in ((lm, "output_attentions", "attention weights are not returned"),
                              (wrapper, "encoder_outputs", "the encoder runs inside the forward"),
                              (bart, "encoder_outputs", "the encoder runs inside the forward"),
                              (lm, "atention_mask", "")):
        with pytest.raises(TrlaxTypeError, match=f"__call__ takes no {name}.*{hint}"):
            model(IDS, **{name: True})


def test_the_old_flax_apis_neutral_arguments_pass_and_flags_must_be_bools(lm, bart):
    """`return_dict=True` / `output_attentions=False` (what the old transformers Flax API and TRL's callers pass)
    were refused as unknown keywords; an old positional call that lands a key on `train` failed inside jit with a
    raw "Non-hashable static arguments" ValueError."""
    for model in (lm, bart):
        extra = {"decoder_input_ids": np.array([[2], [2]])} if model is bart else {}
        expected = np.asarray(model(IDS, **extra).logits)
        out = model(IDS, return_dict=True, output_attentions=False, **extra)
        np.testing.assert_array_equal(np.asarray(out.logits), expected)
        for name, value in (("return_dict", False), ("output_attentions", True)):
            with pytest.raises(TrlaxTypeError, match=f"takes no {name}={value}"):
                model(IDS, **{name: value}, **extra)
    with pytest.raises(TrlaxTypeError, match="train must be True or False; got PRNGKeyArray"):
        lm(IDS, None, None, lm.params, None, jax.random.key(0))
    with pytest.raises(TrlaxTypeError, match="output_hidden_states must be True or False; got str"):
        lm(IDS, output_hidden_states="yes")


def test_a_start_token_per_row_is_refused_by_name(bart):
    """transformers takes one decoder start id per row; trlax raised a raw TypeError from int([...])."""
    for start in ([2, 2], np.array([2, 2])):
        with pytest.raises(UnsupportedModelError, match="decoder_start_token_id must be one token id"):
            bart.generate(IDS, max_new_tokens=2, decoder_start_token_id=start)


def test_seq2seq_learned_positions_bound_encoder_and_decoder(bart):
    with pytest.raises(InputError, match="input_ids: BART has 16 positions; got a sequence of 20 tokens"):
        bart(np.ones((1, 20), np.int32), decoder_input_ids=np.array([[2]]))
    with pytest.raises(InputError, match="decoder_input_ids: BART has 16 positions; got a sequence of 17"):
        bart(np.ones((1, 3), np.int32), decoder_input_ids=np.full((1, 17), 2))
    with pytest.raises(InputError, match="input_ids: BART has 16 positions"):
        bart.generate(np.ones((1, 20), np.int32), max_new_tokens=2)


# --- under jit: the checked mode -----------------------------------------------------------
def test_checked_mode_compiles_range_checks_into_a_jitted_step(lm, wrapper):
    step = checked(lambda p, ids, mask: lm.apply(p, ids, mask, check_inputs=True).logits)
    good = jnp.asarray(IDS)
    np.testing.assert_allclose(np.asarray(step(lm.params, good, jnp.ones_like(good))),
                               np.asarray(lm(IDS).logits), atol=1e-6)
    bad = good.at[0, 1].set(VOCAB + 3)
    with pytest.raises(InputError, match=rf"outside the vocabulary \[0, {VOCAB}\) \(min 5, max 104\)"):
        step(lm.params, bad, jnp.ones_like(bad))
    value_step = checked(lambda p, ids, mask, pos: wrapper.apply(p, ids, mask, pos, check_inputs=True)[2])
    positions = jnp.asarray([[0, 1, 2, 70], [0, 1, 2, 3]])
    with pytest.raises(InputError, match="position_ids out of range"):
        value_step(wrapper.params, good, jnp.ones_like(good), positions)


# --- params of another model ----------------------------------------------------------------
def test_params_of_another_model_raise_naming_the_first_path(lm, wrapper, other_params, tmp_path):
    message = r"params do not fit this gpt2 model: 'transformer/h/2/attn/c_attn/bias' is not a param"
    ids, mask = jnp.asarray(IDS), jnp.ones_like(jnp.asarray(IDS))
    with pytest.raises(InputError, match=message):
        lm(IDS, params=other_params)
    with pytest.raises(InputError, match=message):
        lm.apply(other_params, ids, mask)
    with pytest.raises(InputError, match=message):
        jax.jit(lm.apply)(other_params, ids, mask)
    with pytest.raises(InputError, match=message):
        lm.generate(IDS, params=other_params, max_new_tokens=2)
    with pytest.raises(InputError, match=message):
        lm.save_pretrained(tmp_path / "lm", params=other_params)
    assert not (tmp_path / "lm").exists()
    wrapped = {"pretrained_model": other_params, "v_head": wrapper.params["v_head"]}
    for call in (lambda: wrapper(IDS, params=wrapped), lambda: wrapper.generate(IDS, params=wrapped),
                 lambda: wrapper.save_pretrained(tmp_path / "vh", params=wrapped)):
        with pytest.raises(InputError, match="params\\['pretrained_model'\\] do not fit"):
            call()


def test_mis_shaped_params_name_the_path_and_shapes(lm):
    config = gpt2()
    config.n_embd = 64
    wide = FlaxAutoModelForCausalLM.from_config(config).params
    with pytest.raises(InputError, match=r"'transformer/h/0/attn/c_attn/bias' has shape \(192,\) where this gpt2 "
                                         r"model needs \(96,\)"):
        lm(IDS, params=wide)
    missing = {"transformer": {k: v for k, v in lm.params["transformer"].items() if k != "ln_f"}}
    with pytest.raises(InputError, match="'transformer/ln_f/bias' is missing"):
        lm(IDS, params=missing)
    ints = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), lm.params)
    with pytest.raises(InputError, match="holds integer values where this gpt2 model needs floating"):
        lm(IDS, params=ints)


def test_wrapper_params_need_their_value_head(wrapper, lm):
    with pytest.raises(InputError, match=r"params has no \['pretrained_model', 'v_head'\]"):
        wrapper(IDS, params=lm.params)
    head = {"summary": {"kernel": jnp.zeros((16, 1)), "bias": jnp.zeros((1,))}}
    with pytest.raises(InputError, match=r"params\['v_head'\] do not fit this model's value head: "
                                         r"'summary/kernel' has shape \(16, 1\)"):
        wrapper(IDS, params={"pretrained_model": wrapper.params["pretrained_model"], "v_head": head})


def test_bf16_params_of_the_same_model_are_accepted(lm):
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), lm.params)
    assert lm(IDS, params=bf16).logits.shape == (2, 4, VOCAB)



def test_abstract_params_are_traced_once_per_architecture_and_copied_per_call(monkeypatch):
    config = gpt2()
    config.n_inner = 48  # an architecture no other test in this process has traced
    first = FlaxAutoModelForCausalLM.model_class(config)
    module_class = type(first.module)
    traces = []
    real_init = module_class.init
    monkeypatch.setattr(module_class, "init", lambda self, *a, **k: traces.append(1) or real_init(self, *a, **k))
    tree = first.abstract_params()
    tree["transformer"] = None  # a caller's edit stays in its copy
    again = FlaxAutoModelForCausalLM.model_class(transformers.GPT2Config.from_dict(config.to_dict()))
    assert again.abstract_params()["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"].shape == (32, 48)
    assert len(traces) == 1  # the same config (a copy of it) and dtypes: traced once
    deeper = gpt2()
    deeper.n_inner, deeper.n_layer = 48, 3
    assert "2" in FlaxAutoModelForCausalLM.model_class(deeper).abstract_params()["transformer"]["h"]
    bf16 = FlaxAutoModelForCausalLM.model_class(config, param_dtype=jnp.bfloat16).abstract_params()
    assert bf16["transformer"]["wte"]["embedding"].dtype == jnp.bfloat16
    assert len(traces) == 3  # another config or another param dtype: traced again


# --- the error hierarchy --------------------------------------------------------------------
def test_type_errors_are_trlax_errors_too(wrapper):
    with pytest.raises(TrlaxTypeError, match="create_reference_model takes a trlax value-head model") as info:
        create_reference_model(wrapper.pretrained_model)
    assert isinstance(info.value, TypeError) and isinstance(info.value, TrlaxError)
    with pytest.raises(TypeError, match="must be an int or None"):
        create_reference_model(wrapper, num_shared_layers=1.0)


def test_no_bare_standard_errors_are_raised_by_trlax():
    """Every `raise ValueError/TypeError/KeyError(...)` in trlax/ is a TrlaxError subclass instead."""
    bare = []
    for path in sorted((Path(__file__).resolve().parents[1] / "trlax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in ("ValueError", "TypeError", "KeyError"):
                bare.append(f"{path.name}:{node.lineno} {node.exc.func.id}")
    assert not bare, bare


def test_float_positions_and_labels_and_non_key_dropout_rngs_are_refused(lm, wrapper):
    """position_ids 2.7 was truncated to 2 (torch's embedding raises); dropout_rng=0 raised deep inside JAX; a
    trainable mask of "False" strings counted as trainable and an array leaf failed inside optax."""
    with pytest.raises(InputError, match="position_ids must hold integers; got dtype float32"):
        lm(IDS, position_ids=np.array([[0, 1, 2, 2.7], [0, 1, 2, 3]], np.float32))
    with pytest.raises(InputError, match="position_ids must hold integers"):
        wrapper(IDS, position_ids=np.zeros(IDS.shape, np.float32))
    for model in (lm, wrapper):
        with pytest.raises(TrlaxTypeError, match="dropout_rng must be a jax.random key"):
            model(IDS, train=True, dropout_rng=0)
    assert lm(IDS, np.ones(IDS.shape, bool)).logits.shape[:2] == IDS.shape  # bool and float masks stay fine
    mask = jax.tree_util.tree_map(lambda _: "False", wrapper.trainable_mask)
    with pytest.raises(TrlaxTypeError, match="one bool per params leaf"):
        trlax.split_trainable(wrapper.params, mask)
    with pytest.raises(TrlaxTypeError, match="one bool per params leaf"):
        trlax.trainable.masked_optimizer(optax.sgd(0.1), mask)
    with pytest.raises(TrlaxError, match="exactly the params' tree structure"):
        trlax.trainable.masked_optimizer(optax.sgd(0.1), wrapper.trainable_mask).init({"w": jnp.ones(2)})
