"""PEFT's `lora_dropout`: inverted dropout of each adapted layer's input on its LoRA branch, in training forwards only.

PEFT's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` with `dropout = nn.Dropout(p)`
(identity at p = 0), active in torch's train mode only; trlax's train mode is `train=True, dropout_rng=key`.
The tiny models here have every other dropout off, so any randomness comes from the LoRA branches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

from tests.helpers import max_diff
from tests.test_adapters import randomise_lora_b
from tests.test_sequence_classification import torch_classifier
from tests.tiny_configs import gpt2, llama, t5
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    FlaxAutoModelForSequenceClassification,
    LoraConfig,
    create_reference_model,
)
from trlax.errors import TrlaxError
from trlax.models.layers import Dense, drop_lora_inputs
from trlax.peft.lora import init_lora

IDS = np.array([[5, 17, 33, 2, 64, 9, 71], [8, 40, 3, 99, 12, 50, 27]], np.int32)  # [2, 7]
MASK = np.ones_like(IDS)
# A rate far from 0 and 1, so a forward that drops nothing (or everything) cannot pass by accident.
RATE = 0.5
# The smallest change dropout on the LoRA branches makes to these models' logits (it is ~0.1 to 1).
VISIBLE = 1e-2


def gpt2_without_dropout():
    """The tiny GPT-2 config with its own dropouts off (transformers' defaults are 0.1)."""
    config = gpt2()
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return config


def lora_policy(rate: float, seq2seq: bool = False):
    """A LoRA policy (all-linear, lora_B random so the adapter changes the output) at lora_dropout `rate`, with
    no other dropout (value head included)."""
    lm = FlaxAutoModelForSeq2SeqLM.from_config(t5()) if seq2seq else \
        FlaxAutoModelForCausalLM.from_config(gpt2_without_dropout())
    wrapper = FlaxAutoModelForSeq2SeqLMWithValueHead if seq2seq else FlaxAutoModelForCausalLMWithValueHead
    return wrapper.from_pretrained(lm, summary_dropout_prob=0.0, peft_config=LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=rate))


def policy_inputs(seq2seq: bool) -> tuple[np.ndarray, ...]:
    return (IDS, MASK, IDS, MASK) if seq2seq else (IDS, MASK)


# --- Dense: the exact arithmetic ---------------------------------------------------------------------------------
DENSE_X = np.arange(1.0, 33.0, dtype=np.float32).reshape(4, 8)  # [4, 8], no zeros: a dropped entry is visible
DENSE_KERNEL = (np.arange(64.0, dtype=np.float32).reshape(8, 8) % 5 - 2)  # [8, 8] small integers: exact sums
DENSE_BIAS = np.arange(8.0, dtype=np.float32) - 3.0  # [8]
IDENTITY_ADAPTER = {"lora_A": np.eye(8, dtype=np.float32), "lora_B": np.eye(8, dtype=np.float32),
                    "scaling": np.float32(1.0)}


def dense(rate: float | None, key: jax.Array | None, adapter: dict | None = None) -> np.ndarray:
    """Dense(8) with DENSE_KERNEL, DENSE_BIAS and the identity adapter (scaling 1) on DENSE_X, under
    drop_lora_inputs(rate) (None: outside it), with `key` as the dropout rng (None: no rngs)."""
    variables = {"params": {"kernel": DENSE_KERNEL, "bias": DENSE_BIAS}, "lora": adapter or IDENTITY_ADAPTER}
    rngs = None if key is None else {"dropout": key}
    if rate is None:
        return np.asarray(Dense(8).apply(variables, DENSE_X, rngs=rngs))
    with drop_lora_inputs(rate):
        return np.asarray(Dense(8).apply(variables, DENSE_X, rngs=rngs))


def test_dense_lora_branch_gets_inverted_dropout_of_its_input_and_the_base_none():
    base = DENSE_X @ DENSE_KERNEL + DENSE_BIAS  # exact: small integers
    deterministic = dense(None, None)
    np.testing.assert_array_equal(deterministic, base + DENSE_X)  # identity adapter, scaling 1: + x
    out = dense(RATE, jax.random.key(0))
    branch = out - base  # the LoRA branch: dropout(x) @ I @ I * 1
    kept = branch != 0  # m, the mask (no x entry is 0)
    np.testing.assert_array_equal(branch, np.where(kept, DENSE_X / (1 - RATE), 0.0))  # x * m / (1 - p), exactly
    assert kept.any() and not kept.all()  # both dropped and kept entries (16 of 32 expected)
    # The base projection sees x undropped: with lora_B = 0 the output is the base's, bit for bit.
    silent = {**IDENTITY_ADAPTER, "lora_B": np.zeros((8, 8), np.float32)}
    np.testing.assert_array_equal(dense(RATE, jax.random.key(0), silent), base)
    # Same key, same mask; another key, another mask.
    np.testing.assert_array_equal(dense(RATE, jax.random.key(0)), out)
    assert ((dense(RATE, jax.random.key(1)) - base != 0) != kept).any()
    # Rate 0, or no drop_lora_inputs context (what an eval forward traces), is the deterministic output exactly.
    np.testing.assert_array_equal(dense(0.0, jax.random.key(0)), deterministic)
    np.testing.assert_array_equal(dense(None, jax.random.key(0)), deterministic)


def test_dense_draws_one_mask_per_module_path():
    """Two Dense layers with the same input and adapter draw different masks from one dropout key (Flax's
    make_rng folds in the module path), as PEFT's per-layer nn.Dropout draws independently."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return Dense(8, name="first")(x), Dense(8, name="second")(x)

    layer = {"kernel": np.zeros((8, 8), np.float32), "bias": np.zeros(8, np.float32)}
    variables = {"params": {"first": layer, "second": layer},
                 "lora": {"first": IDENTITY_ADAPTER, "second": IDENTITY_ADAPTER}}
    with drop_lora_inputs(RATE):
        first, second = Two().apply(variables, DENSE_X, rngs={"dropout": jax.random.key(0)})
    assert ((np.asarray(first) != 0) != (np.asarray(second) != 0)).any()


@pytest.mark.parametrize("rate", [-0.1, 1.0, True, "0.5"])
def test_a_lora_dropout_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(TrlaxError, match=r"lora_dropout must be in \[0, 1\)"), drop_lora_inputs(rate):
        pass
    lm = FlaxAutoModelForCausalLM.from_config(gpt2_without_dropout())
    with pytest.raises(TrlaxError, match=r"lora_dropout must be in \[0, 1\)"):
        lm.apply(lm.params, IDS, MASK, lora_dropout=rate)


# --- a model's apply: the explicit rate --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "seq2seq", "sequence_classification"])
def test_each_model_apply_takes_the_rate_with_the_adapter(kind):
    """`apply(..., lora=tree, lora_dropout=p)`: dropout on the adapter's branches with train=True only."""
    auto, config = {"causal": (FlaxAutoModelForCausalLM, gpt2_without_dropout),
                    "seq2seq": (FlaxAutoModelForSeq2SeqLM, t5),
                    "sequence_classification": (FlaxAutoModelForSequenceClassification, llama)}[kind]
    model = auto.from_config(config())
    lora = init_lora(LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), model.params,
                     model.config.model_type, jax.random.key(0))
    inputs = (IDS, MASK, IDS, MASK) if kind == "seq2seq" else (IDS, MASK)
    key = jax.random.key(8)

    def logits(**kwargs) -> jax.Array:
        return model.apply(model.params, *inputs, lora=lora, **kwargs).logits

    evaluated = logits()
    assert max_diff(logits(train=True, dropout_rng=key, lora_dropout=RATE), evaluated) > VISIBLE
    np.testing.assert_array_equal(logits(train=True, dropout_rng=key), evaluated)  # default rate 0
    np.testing.assert_array_equal(logits(lora_dropout=RATE), evaluated)  # eval: no dropout
    # No adapter: nothing to drop.
    base = model.apply(model.params, *inputs).logits
    np.testing.assert_array_equal(
        model.apply(model.params, *inputs, train=True, dropout_rng=key, lora_dropout=RATE).logits, base)


# --- policies: the adapter's rate --------------------------------------------------------------------------------
@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "seq2seq"])
def test_a_policy_trains_with_its_lora_dropout(seq2seq):
    policy = lora_policy(RATE, seq2seq)
    inputs = policy_inputs(seq2seq)
    key = jax.random.key(3)
    logits, _, values = policy(*inputs)
    train_logits, _, train_values = policy(*inputs, train=True, dropout_rng=key)
    assert max_diff(train_logits, logits) > VISIBLE and max_diff(train_values, values) > 0
    again = policy(*inputs, train=True, dropout_rng=key)
    np.testing.assert_array_equal(again[0], train_logits)  # same key, same masks
    np.testing.assert_array_equal(again[2], train_values)
    assert max_diff(policy(*inputs, train=True, dropout_rng=jax.random.key(4))[0], train_logits) > VISIBLE
    # The pure forward a train step jits does the same.
    np.testing.assert_array_equal(policy.apply(policy.params, *inputs, train=True, dropout_rng=key)[0],
                                  train_logits)
    # The view LM uses its owner's adapter and so its rate; the wrapper hands the LM the first half of its key.
    lm_key = jax.random.split(key)[0]
    view = policy.pretrained_model(*inputs, train=True, dropout_rng=lm_key).logits
    np.testing.assert_allclose(view, train_logits, atol=1e-6, rtol=0)
    # With its own params it runs the base alone, which has no dropout left to apply.
    base = policy.pretrained_model(*inputs, params=policy.params["pretrained_model"]).logits
    np.testing.assert_array_equal(
        policy.pretrained_model(*inputs, params=policy.params["pretrained_model"], train=True,
                                dropout_rng=lm_key).logits, base)


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "seq2seq"])
def test_rate_zero_trains_as_eval_bit_for_bit_with_no_random_op_traced(seq2seq):
    inputs = policy_inputs(seq2seq)
    key = jax.random.key(3)

    def random_ops(policy) -> int:
        """Random draws and key derivations other than the wrapper's split of dropout_rng into LM and head."""
        text = str(jax.make_jaxpr(lambda p, k: policy.apply(p, *inputs, train=True, dropout_rng=k))(
            policy.params, key))
        return text.count("random_bits") + text.count("random_fold_in")

    policy = lora_policy(0.0, seq2seq)
    eval_out = policy(*inputs)
    train_out = policy(*inputs, train=True, dropout_rng=key)
    for a, b in zip(train_out, eval_out, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert random_ops(policy) == 0
    # The same policy at RATE draws a mask per adapted layer: the count above would see them.
    policy.peft_config["default"].lora_dropout = RATE
    assert random_ops(policy) > 0


def test_lora_dropout_reaches_the_gradients_of_the_adapter():
    policy = lora_policy(RATE)
    key = jax.random.key(5)

    def lora_grads(train: bool):
        def loss(lora):
            params = {**policy.params, "lora": lora}
            logits, _, values = policy.apply(params, IDS, MASK, train=train, dropout_rng=key if train else None)
            return jnp.mean(jnp.square(logits)) + jnp.mean(values)
        return jax.jit(jax.grad(loss))(policy.params["lora"])

    train, evaluated = lora_grads(True), lora_grads(False)
    a_and_b = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(train)
               if path[-1].key in ("lora_A", "lora_B")]
    assert len(a_and_b) == 2 * 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks: lora_A and lora_B each
    assert all(np.isfinite(np.asarray(leaf)).all() and np.abs(np.asarray(leaf)).max() > 0 for _, leaf in a_and_b)
    differs = jax.tree_util.tree_map(lambda t, e: max_diff(t, e), train, evaluated)
    assert max(jax.tree_util.tree_leaves(differs)) > VISIBLE  # the backward pass sees the dropped inputs too


def test_the_jitted_forward_is_keyed_by_the_rate():
    policy = lora_policy(0.0)
    key = jax.random.key(6)
    eval_logits = policy(IDS, MASK)[0]
    np.testing.assert_array_equal(policy(IDS, MASK, train=True, dropout_rng=key)[0], eval_logits)
    policy.peft_config["default"].lora_dropout = RATE  # the config is the policy's own, and mutable
    dropped = policy(IDS, MASK, train=True, dropout_rng=key)[0]
    assert max_diff(dropped, eval_logits) > VISIBLE  # not the program traced at rate 0
    view = policy.pretrained_model(IDS, MASK, train=True, dropout_rng=jax.random.split(key)[0]).logits
    assert max_diff(view, eval_logits) > VISIBLE  # the view LM reads the rate at each call too
    policy.peft_config["default"].lora_dropout = 0.25
    assert max_diff(policy(IDS, MASK, train=True, dropout_rng=key)[0], dropped) > VISIBLE
    policy.peft_config["default"].lora_dropout = 0.0
    np.testing.assert_array_equal(policy(IDS, MASK, train=True, dropout_rng=key)[0], eval_logits)


def test_the_reference_of_a_lora_policy_applies_no_lora_dropout():
    policy = lora_policy(RATE)
    reference = create_reference_model(policy)
    key = jax.random.key(7)
    assert max_diff(policy(IDS, MASK, train=True, dropout_rng=key)[0], policy(IDS, MASK)[0]) > VISIBLE
    ref_logits, _, ref_values = reference(IDS, MASK)
    train_logits, _, train_values = reference(IDS, MASK, train=True, dropout_rng=key)
    np.testing.assert_array_equal(train_logits, ref_logits)
    np.testing.assert_array_equal(train_values, ref_values)
    base = policy.pretrained_model(IDS, MASK, params=policy.params["pretrained_model"]).logits
    np.testing.assert_array_equal(ref_logits, base)  # the base with the adapter off


def test_a_peft_seq_cls_adapter_model_trains_with_its_lora_dropout(tmp_path):
    """A PEFT SEQ_CLS adapter on its classifier applies its adapter at every call, and so its rate with train=True
    (as PEFT's model in train mode)."""
    pm = peft.get_peft_model(torch_classifier("llama", tmp_path / "base", num_labels=2), peft.LoraConfig(
        task_type="SEQ_CLS", target_modules="all-linear", r=4, lora_dropout=RATE))
    randomise_lora_b(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    model = FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert model.lora_dropout == RATE
    key = jax.random.key(10)
    evaluated = model(IDS, MASK).logits
    assert max_diff(model(IDS, MASK, train=True, dropout_rng=key).logits, evaluated) > VISIBLE
    assert max_diff(model(IDS, MASK, params=model.params, train=True, dropout_rng=key).logits, evaluated) > VISIBLE
    model.adapter_config.lora_dropout = 0.0
    np.testing.assert_array_equal(model(IDS, MASK, train=True, dropout_rng=key).logits, evaluated)


def test_gradient_checkpointing_draws_the_same_masks():
    policy = lora_policy(RATE)
    key = jax.random.key(9)
    plain = policy(IDS, MASK, train=True, dropout_rng=key)[0]
    assert max_diff(plain, policy(IDS, MASK)[0]) > VISIBLE
    policy.gradient_checkpointing_enable()
    np.testing.assert_allclose(policy(IDS, MASK, train=True, dropout_rng=key)[0], plain, atol=1e-6, rtol=0)
