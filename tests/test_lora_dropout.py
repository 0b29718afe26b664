"""PEFT's `lora_dropout`: inverted dropout of each adapted layer's input on its LoRA branch, in training forwards only.

PEFT's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` with `dropout = nn.Dropout(p)`
(identity at p = 0), active in torch's train mode only; trlax's train mode is `train=True, dropout_rng=key`.
The tiny models here have every other dropout off, so any randomness comes from the LoRA branches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.helpers import max_diff
from tests.tiny_configs import gpt2, llama, t5
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
    LoraConfig,
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
