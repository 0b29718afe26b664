"""Changing `model.config` (or copying a model) after it is built, as TRL and transformers users do.

transformers builds its modules from the config (the embedding's `padding_idx`, RoPE, the router
aux-loss coefficient are read then) and reads a few fields at every forward (Granite's
`logits_scaling`, Gemma 2's `final_logit_softcapping`, `output_hidden_states`). trlax's module
reads its own copy of the config taken at build, and the per-forward fields follow `model.config`,
including in programs jit compiled before the change. float32, atol 1e-4 against transformers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff
from tests.parity_checks import make_pair
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    create_reference_model,
)
from trlax.errors import InputError

ATOL = 1e-4


@pytest.fixture(scope="module")
def granite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    folder = tmp_path_factory.mktemp("granite")
    pt, _ = make_pair(TINY_CAUSAL["granite"](), folder)
    return folder, pt


def _torch_logits(pt: transformers.PreTrainedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _sampled(model, prompt: np.ndarray) -> np.ndarray:
    """12 tokens sampled with a fixed key (greedy tokens cannot see a logit scale)."""
    out = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=0, prng_key=jax.random.key(3))
    return np.asarray(out.sequences)


def test_a_pad_id_set_after_loading_leaves_the_embedding_trainable_as_in_transformers(tmp_path):
    """`config.pad_token_id = eos` after loading (TRL's usual set-up) froze the eos row of the embedding in trlax
    (its padding_idx was read at every trace); transformers fixes padding_idx when the model is built."""
    config = TINY_CAUSAL["llama"]()
    config.pad_token_id = None
    pt, model = make_pair(config, tmp_path)
    eos = int(config.eos_token_id)
    model(*batch(model.vocab_size, "right"))  # traced before the change, too
    pt.config.pad_token_id = model.config.pad_token_id = eos
    ids, mask = batch(model.vocab_size, "right")
    ids[:, 1] = eos
    ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(ids))
    ref.loss.backward()

    def loss(params):
        return model.apply(params, jnp.asarray(ids), jnp.asarray(mask), labels=jnp.asarray(ids)).loss

    grad = np.asarray(jax.grad(loss)(model.params)["model"]["embed_tokens"]["embedding"])
    torch_grad = pt.model.embed_tokens.weight.grad.numpy()
    assert np.abs(torch_grad[eos]).max() > 1e-3  # the eos row trains in transformers
    assert max_diff(torch_grad, grad) < 1e-5


def test_a_per_forward_field_changed_after_a_call_reaches_forward_and_generate(granite):
    """Granite's logits_scaling is read at every forward by transformers; trlax kept the value its jitted forward
    and generate were compiled with (2.8 off at an already-compiled shape, right at a new one)."""
    folder, pt = granite
    pt = copy.deepcopy(pt)
    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    ids, mask = batch(model.vocab_size, "right")
    before = np.asarray(model(ids, mask).logits)
    prompt = ids[:1, :4]
    before_tokens = _sampled(model, prompt)
    pt.config.logits_scaling = model.config.logits_scaling = 1.0
    after = np.asarray(model(ids, mask).logits)
    assert max_diff(_torch_logits(pt, ids, mask), after, mask) < ATOL and np.abs(after - before).max() > 1
    fresh = FlaxAutoModelForCausalLM.from_pretrained(folder)
    fresh.config.logits_scaling = 1.0
    np.testing.assert_array_equal(_sampled(model, prompt), _sampled(fresh, prompt))
    assert not np.array_equal(_sampled(model, prompt), before_tokens)


def test_the_reference_keeps_its_own_config(granite):
    """TRL's reference is a deep copy; trlax's shared the policy's Linen module, which held the policy's config."""
    folder, _ = granite
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder)
    reference = create_reference_model(policy)
    ids, mask = batch(policy.config.vocab_size, "right")
    logits = np.asarray(reference(ids, mask)[0])
    policy.config.logits_scaling = 0.5
    assert np.abs(np.asarray(policy(ids, mask)[0]) - logits).max() > 1
    np.testing.assert_array_equal(np.asarray(reference(ids, mask)[0]), logits)
    new_shape = batch(policy.config.vocab_size, "right", seq_len=5)
    np.testing.assert_allclose(np.asarray(reference(*new_shape)[0]),
                               np.asarray(create_reference_model(
                                   FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder))(*new_shape)[0]),
                               atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_deep_copy_is_independent_of_the_original(granite, wrapped):
    """copy.deepcopy copied the jitted forward and generation cache as closures over the original: the copy ran
    the original's module and config (2.4 off transformers' copy) and shared its gradient-checkpointing switch."""
    folder, pt = granite
    cls = FlaxAutoModelForCausalLMWithValueHead if wrapped else FlaxAutoModelForCausalLM
    model = cls.from_pretrained(folder)
    ids, mask = batch(model.config.vocab_size, "right")
    prompt = ids[:1, :4]
    original = np.asarray(model(ids, mask)[0] if wrapped else model(ids, mask).logits)
    original_tokens = _sampled(model, prompt)
    copied = copy.deepcopy(model)
    copied.config.logits_scaling = 1.0
    copied.gradient_checkpointing_enable()
    assert not model.is_gradient_checkpointing
    pt_copy = copy.deepcopy(pt)
    pt_copy.config.logits_scaling = 1.0
    logits = np.asarray(copied(ids, mask)[0] if wrapped else copied(ids, mask).logits)
    assert max_diff(_torch_logits(pt_copy, ids, mask), logits, mask) < ATOL
    np.testing.assert_array_equal(np.asarray(model(ids, mask)[0] if wrapped else model(ids, mask).logits), original)
    fresh = cls.from_pretrained(folder)
    fresh.config.logits_scaling = 1.0
    np.testing.assert_array_equal(_sampled(copied, prompt), _sampled(fresh, prompt))
    np.testing.assert_array_equal(_sampled(model, prompt), original_tokens)
    assert not np.array_equal(_sampled(copied, prompt), original_tokens)
    if wrapped:
        assert copied.pretrained_model.params is copied.params["pretrained_model"]


def test_config_output_hidden_states_is_the_forwards_default(granite):
    """transformers returns hidden states when config.output_hidden_states is set; trlax's LM ignored it."""
    folder, pt = granite
    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    ids, mask = batch(model.vocab_size, "right")
    assert model(ids, mask).hidden_states is None
    model.config.output_hidden_states = True
    assert len(model(ids, mask).hidden_states) == model.config.num_hidden_layers + 1
    assert model(ids, mask, output_hidden_states=False).hidden_states is None


def test_a_reference_starts_equal_to_its_policy_after_a_build_time_field_changed(granite):
    """Granite's embedding_multiplier is read when the model is built: transformers' (and the policy's) forward
    ignores a later change, but the reference was rebuilt from the changed config (0.69 off its policy at step 0)."""
    folder, _ = granite
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(folder)
    ids, mask = batch(policy.config.vocab_size, "right")
    before = np.asarray(policy(ids, mask)[0])
    policy.config.embedding_multiplier = 1.0
    reference = create_reference_model(policy)
    np.testing.assert_array_equal(np.asarray(policy(ids, mask)[0]), before)
    np.testing.assert_array_equal(np.asarray(reference(ids, mask)[0]), before)


def test_sizes_and_structure_come_from_the_config_the_model_was_built_with(tmp_path):
    """After `config.vocab_size` changed: the input check read the new size (an id past the table passed), and the
    abstract-params cache stored the old module's tree under the new config, so a model really built with it
    refused its own params."""
    config = TINY_CAUSAL["llama"]()
    _, model = make_pair(config, tmp_path)
    built = model.vocab_size
    model.config.vocab_size = built + 16
    ids = np.full((1, 3), built + 9)
    with pytest.raises(InputError, match=f"outside the vocabulary \\[0, {built}\\)"):
        model(ids)
    model(np.ones((1, 3), np.int32))
    config.vocab_size = built + 16
    other = FlaxAutoModelForCausalLM.from_config(config)
    assert other(ids).logits.shape == (1, 3, built + 16)


def test_a_sliding_window_changed_after_a_call_reaches_the_forward_as_in_transformers(tmp_path):
    """transformers builds its attention masks from config.sliding_window at each call."""
    pt, model = make_pair(TINY_CAUSAL["mistral"](), tmp_path)
    ids, mask = batch(model.vocab_size, "right")
    windowed = np.asarray(model(ids, mask).logits)
    pt.config.sliding_window = model.config.sliding_window = None
    full = np.asarray(model(ids, mask).logits)
    assert np.abs(full - windowed).max() > 1e-2
    assert max_diff(_torch_logits(pt, ids, mask), full, mask) < ATOL


@pytest.mark.parametrize("change", [-8, 8])
def test_a_seq2seq_position_check_reads_the_table_the_model_was_built_with(change):
    """BART's input check read `model.config.max_position_embeddings`: lowered after the build, it refused inputs
    the model's table embeds (transformers runs them); raised, the module's own check still refuses a sequence
    past the table. The causal check reads the built table already."""
    model = FlaxAutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ["bart"]())
    table = model.config.max_position_embeddings
    fits, mask = batch(model.vocab_size, "right", batch_size=2, seq_len=table - 2)
    want = np.asarray(model(fits, mask, decoder_input_ids=fits).logits)
    model.config.max_position_embeddings = table + change
    np.testing.assert_array_equal(np.asarray(model(fits, mask, decoder_input_ids=fits).logits), want)
    too_long = np.ones((1, table + 1), np.int32)
    with pytest.raises(InputError, match=f"BART has {table} positions"):
        model(too_long, decoder_input_ids=fits[:1])
