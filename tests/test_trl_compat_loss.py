"""`labels=` as TRL passes them: transformers' LM loss as the wrapper's second output, under jit and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
)
from trlax.inputs import InputError

VOCAB = 101
LOSS_ATOL = 1e-5


def _pair(kind, model_type, folder):
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForSeq2SeqLM
    config = (TINY_CAUSAL if kind == "causal" else TINY_SEQ2SEQ)[model_type]()
    torch.manual_seed(0)
    pt = torch_random_init(auto.from_config(config), std=0.1)
    wrapper = (FlaxAutoModelForCausalLMWithValueHead if kind == "causal" else FlaxAutoModelForSeq2SeqLMWithValueHead)
    return pt, wrapper.from_pretrained(save_torch(pt, folder), summary_dropout_prob=0.0)


def _labels(ids, mask):
    labels = ids.copy()
    labels[mask == 0] = -100
    return labels


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_causal_loss_matches_transformers(tmp_path, model_type):
    pt, model = _pair("causal", model_type, tmp_path)
    ids, mask = batch(VOCAB, "right", low=2)
    labels = _labels(ids, mask)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    logits, loss, values = model(ids, attention_mask=mask, labels=labels)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert abs(float(loss) - float(ref)) < LOSS_ATOL
    assert model(ids, attention_mask=mask)[1] is None
    # The LM on its own returns the same loss on its output.
    assert abs(float(model.pretrained_model(ids, mask, labels=labels).loss) - float(ref)) < LOSS_ATOL


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_seq2seq_loss_matches_transformers_with_derived_decoder_inputs(tmp_path, model_type):
    pt, model = _pair("seq2seq", model_type, tmp_path)
    ids, mask = batch(VOCAB, "right", low=2)
    labels, lmask = batch(VOCAB, "right", seq_len=6, seed=1, low=2)
    labels = _labels(labels, lmask)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    logits, loss, _ = model(ids, attention_mask=mask, labels=labels)
    assert abs(float(loss) - float(ref.loss)) < LOSS_ATOL
    assert float(np.abs(np.asarray(logits) - ref.logits.numpy()).max()) < 1e-4
    # Explicit decoder inputs win over the derived ones, as in transformers.
    dec = np.roll(np.where(labels == -100, 0, labels), 1, axis=1)
    with torch.no_grad():
        ref2 = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                  labels=torch.tensor(labels)).loss
    assert abs(float(model(ids, mask, decoder_input_ids=dec, labels=labels)[1]) - float(ref2)) < LOSS_ATOL


def test_loss_backpropagates_like_trl_tests_do(tmp_path):
    """TRL's tests back-propagate output[1]: the same under jax.grad of the pure apply, jitted."""
    pt, model = _pair("causal", "gpt2", tmp_path)
    ids, mask = batch(VOCAB, "none", low=2)
    labels = _labels(ids, mask)

    def loss_fn(params):
        return model.apply(params, jnp.asarray(ids), jnp.asarray(mask), labels=jnp.asarray(labels))[1]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model.params)
    ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    ref.backward()
    assert abs(float(loss) - ref.item()) < LOSS_ATOL
    wte = np.asarray(grads["pretrained_model"]["transformer"]["wte"]["embedding"])
    assert float(np.abs(wte - pt.transformer.wte.weight.grad.numpy()).max()) < 1e-5
    assert not np.any(np.asarray(grads["v_head"]["summary"]["kernel"]))  # the loss does not see the head


def test_all_ignored_labels_give_nan_as_torch(tmp_path):
    _, model = _pair("causal", "gpt2", tmp_path)
    ids, _ = batch(VOCAB, "none")
    assert np.isnan(float(model(ids, labels=np.full_like(ids, -100))[1]))


def test_bad_labels_raise(tmp_path):
    _, model = _pair("causal", "gpt2", tmp_path)
    ids, _ = batch(VOCAB, "none")
    with pytest.raises(InputError, match="labels must have the shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(InputError, match="labels must hold integer"):
        model(ids, labels=ids.astype(np.float32))


@pytest.mark.parametrize("bad", [VOCAB, -1, -5])
def test_labels_outside_the_vocabulary_raise_as_torch_does(tmp_path, bad):
    """PyTorch's cross-entropy raises on them; JAX would give a NaN loss (>= vocab) or score the label
    against the end of the vocabulary (negative)."""
    causal_pt, causal = _pair("causal", "gpt2", tmp_path / "causal")
    _, seq2seq = _pair("seq2seq", "t5", tmp_path / "t5")
    ids, _ = batch(VOCAB, "none")
    labels = ids.copy()
    labels[0, -1] = bad
    with pytest.raises(InputError, match=f"labels holds {bad}"):
        causal(ids, labels=labels)
    with pytest.raises(InputError, match=f"labels holds {bad}"):
        causal.pretrained_model(ids, labels=labels)
    with pytest.raises(InputError, match=f"labels holds {bad}"):
        seq2seq(ids, labels=labels)
    with pytest.raises(IndexError):
        causal_pt(torch.tensor(ids), labels=torch.tensor(labels))
    labels[0, -1] = -100  # ignored, not out of range
    assert np.isfinite(float(causal(ids, labels=labels)[1]))


def test_traced_labels_are_checked_inside_checked():
    from trlax.inputs import checked

    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(
        TINY_CAUSAL["gpt2"]()), summary_dropout_prob=0.0)
    ids, mask = batch(VOCAB, "none")
    step = checked(lambda p, i, m, y: model.apply(p, i, m, labels=y, check_inputs=True)[1])
    assert np.isfinite(float(step(model.params, ids, mask, ids)))
    with pytest.raises(InputError, match="labels outside the vocabulary"):
        step(model.params, ids, mask, np.full_like(ids, VOCAB))
