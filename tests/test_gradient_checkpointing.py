"""transformers' gradient_checkpointing_enable/disable, eval() and train() on trlax models and wrappers.

Enabled, every block of the layer stack is rematerialised (`nn.remat`, JAX's `jax.checkpoint`):
the same params, outputs and gradients, with the remat primitive in the differentiated program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import batch
from tests.tiny_configs import gpt2, llama, t5
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    FlaxAutoModelForSequenceClassification,
    create_reference_model,
)
from trlax.errors import TrlaxTypeError
from trlax.models.stack import remat_blocks

# The name jax.checkpoint's primitive has in a jaxpr (found, not assumed: "remat2" in JAX 0.10).
REMAT = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name
IDS, MASK = batch(101, "right")
LABELS = np.where(MASK == 1, IDS, -100)
CONFIGS = {"gpt2": (gpt2, False), "llama": (llama, False), "t5": (t5, True)}


def remats(fn, *args) -> int:
    """How many remat equations the jaxpr of `fn(*args)` holds (nested jaxprs included, as printed)."""
    return str(jax.make_jaxpr(fn)(*args)).count(f" {REMAT}[")


def num_blocks(config, seq2seq: bool) -> int:
    return config.num_layers + config.num_decoder_layers if seq2seq else config.num_hidden_layers


def lm_loss(model, seq2seq: bool):
    """params -> the LM loss [] float32 of `model.apply` on the fixed batch, with dropout on (the pure forward)."""
    key = jax.random.key(1)
    if seq2seq:
        return lambda p: model.apply(p, IDS, MASK, IDS, MASK, labels=LABELS, train=True, dropout_rng=key).loss
    return lambda p: model.apply(p, IDS, MASK, labels=LABELS, train=True, dropout_rng=key).loss


def max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b), strict=True))


def test_param_tree_unchanged_under_remat():
    model = FlaxAutoModelForCausalLM.model_class(gpt2())

    def init():
        return model.module.init(jax.random.key(0), *model.dummy_inputs())["params"]

    with remat_blocks(True):
        assert remats(init) == 2  # each block's params are created inside its remat
        remat = jax.eval_shape(init)
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), remat) == \
        jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), model.abstract_params())
    assert "kernel" in remat["transformer"]["h"]["0"]["attn"]["c_attn"]


@pytest.mark.parametrize("name", ["gpt2", "llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_remat_gradients_match(name):
    make, seq2seq = CONFIGS[name]
    config = make()
    model = (FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM).from_config(config)
    loss = lm_loss(model, seq2seq)
    assert not model.is_gradient_checkpointing
    assert remats(jax.grad(loss), model.params) == 0
    loss_off, grads_off = jax.jit(jax.value_and_grad(loss))(model.params)

    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert remats(jax.grad(loss), model.params) == num_blocks(config, seq2seq)
    loss_on, grads_on = jax.jit(jax.value_and_grad(loss))(model.params)
    assert abs(float(loss_on) - float(loss_off)) <= 1e-6
    assert max_abs_diff(grads_on, grads_off) <= 1e-6

    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert remats(jax.grad(loss), model.params) == 0


def test_jitted_forward_follows_setting():
    """The model's own jitted forward is compiled apart per setting: switching back and forth never reuses
    the other program (traced under jax.grad through `model(...)`)."""
    model = FlaxAutoModelForCausalLM.from_config(gpt2())

    def grad_remats() -> int:  # a new function each time, so only the model's jit could cache a stale program
        return remats(jax.grad(lambda p: model(IDS, MASK, params=p).logits.sum()), model.params)

    logits_off = model(IDS, MASK).logits
    assert grad_remats() == 0
    model.gradient_checkpointing_enable()
    assert grad_remats() == 2
    np.testing.assert_array_equal(model(IDS, MASK).logits, logits_off)
    model.gradient_checkpointing_disable()
    assert grad_remats() == 0


def test_sequence_classifier_has_the_switch():
    model = FlaxAutoModelForSequenceClassification.model_class(llama(), num_labels=1)
    model.params = jax.tree_util.tree_map(jnp.zeros_like, model.abstract_params())
    model.gradient_checkpointing_enable()
    assert remats(jax.grad(lambda p: model.apply(p, IDS, MASK).logits.sum()), model.params) == 2


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_wrapper_delegates_and_honours_setting(name):
    make, seq2seq = CONFIGS[name]
    config = make()
    lm = (FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM).from_config(config)
    lm.gradient_checkpointing_enable()
    wrapper_cls = FlaxAutoModelForSeq2SeqLMWithValueHead if seq2seq else FlaxAutoModelForCausalLMWithValueHead
    wrapper = wrapper_cls.from_pretrained(lm, summary_dropout_prob=0.0)
    assert wrapper.is_gradient_checkpointing and wrapper.pretrained_model.is_gradient_checkpointing  # inherited
    inputs = (IDS, MASK, IDS, MASK) if seq2seq else (IDS, MASK)
    blocks = num_blocks(config, seq2seq)

    def apply_loss(p):  # the pure forward a train step differentiates
        logits, _, values = wrapper.apply(p, *inputs, train=True, dropout_rng=jax.random.key(1))
        return logits.mean() + values.mean()

    def call_remats() -> int:  # the wrapper's own jitted forward, traced under jax.grad
        return remats(jax.grad(lambda p: wrapper(*inputs, params=p)[2].sum()), wrapper.params)

    assert remats(jax.grad(apply_loss), wrapper.params) == blocks
    assert call_remats() == blocks
    grads_on = jax.jit(jax.grad(apply_loss))(wrapper.params)

    wrapper.gradient_checkpointing_disable()
    assert not wrapper.is_gradient_checkpointing and not wrapper.pretrained_model.is_gradient_checkpointing
    assert remats(jax.grad(apply_loss), wrapper.params) == 0
    assert call_remats() == 0
    assert max_abs_diff(jax.jit(jax.grad(apply_loss))(wrapper.params), grads_on) <= 1e-6

    wrapper.gradient_checkpointing_enable({"use_reentrant": False})
    assert call_remats() == blocks


def test_reference_model_does_not_inherit_setting():
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(gpt2()),
                                                                   summary_dropout_prob=0.0)
    policy.gradient_checkpointing_enable()
    reference = create_reference_model(policy)
    assert policy.is_gradient_checkpointing and not reference.is_gradient_checkpointing
    np.testing.assert_allclose(reference(IDS, MASK)[2], policy(IDS, MASK)[2], atol=1e-6)


def test_gradient_checkpointing_kwargs_accepted_or_refused():
    model = FlaxAutoModelForCausalLM.model_class(gpt2())
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(None)
    assert model.is_gradient_checkpointing
    for bad in (True, "use_reentrant", [("use_reentrant", False)]):
        with pytest.raises(TrlaxTypeError, match="gradient_checkpointing_kwargs must be a dict"):
            model.gradient_checkpointing_enable(bad)


def test_eval_and_train_switches():
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    wrapper = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm)
    for model in (lm, wrapper):
        assert model.eval() is model
        assert model.train(False) is model
        assert model.train(mode=False) is model
        for args in ((), (True,)):
            with pytest.raises(TypeError, match=r"train=True, dropout_rng=key") as raised:
                model.train(*args)
            assert isinstance(raised.value, TrlaxTypeError)
