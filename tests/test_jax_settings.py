"""trlax under the stricter JAX settings users turn on: jax_numpy_rank_promotion="raise" and
jax_numpy_dtype_promotion="strict" (both refuse implicit conversions inside trlax's own code, which raised
from loading onwards), with the numbers of the default settings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
import optax
import pytest

from tests import tiny_configs
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
    create_reference_model,
    ppo,
    split_trainable,
)
from trlax.ppo_trainer import reply_mask

IDS = np.array([[0, 0, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16]], np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)


@contextlib.contextmanager
def strict() -> Iterator[None]:
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


def _lm_outputs(lm) -> list[np.ndarray]:
    """Loss, logits, a gradient leaf and sampled tokens (top-k, top-p, repetition penalty)."""
    out = lm(IDS, MASK, labels=IDS)
    grads = jax.grad(lambda p: lm(IDS, MASK, params=p, labels=IDS).loss)(lm.params)
    tokens = lm.generate(IDS, attention_mask=MASK, max_new_tokens=3, do_sample=True, prng_key=jax.random.key(0),
                         top_k=5, top_p=0.9, repetition_penalty=1.2).sequences
    return [np.asarray(x) for x in (out.loss, out.logits, jax.tree_util.tree_leaves(grads)[0], tokens)]


# LayerNorm and Dense biases (GPT-2), Gemma's and OLMo 2's RMSNorm variants, BART's logits bias, a float16 T5
# (float32 `wo` and residual), BLOOM's ALiBi in bfloat16; RoPE: Llama below.
@pytest.mark.parametrize(("family", "dtype"), [("gpt2", "float32"), ("gemma", "float32"), ("olmo2", "float32"),
                                               ("bart", "float32"), ("t5", "float16"), ("bloom", "bfloat16")])
def test_a_model_loads_runs_trains_and_generates_as_under_the_defaults(family, dtype):
    seq2seq = family in ("bart", "t5")
    auto, config = (FlaxAutoModelForSeq2SeqLM if seq2seq else FlaxAutoModelForCausalLM), getattr(tiny_configs, family)()
    want = _lm_outputs(auto.from_config(config, dtype=dtype))
    with strict():  # the params' initialisation too (loading traced the model's shapes and raised)
        got = _lm_outputs(auto.from_config(config, dtype=dtype))
    for g, w in zip(got, want, strict=True):  # the same programs: written-out broadcasts, explicit casts
        np.testing.assert_array_equal(g, w)


def test_ppo_and_a_classifier_loss_run_as_under_the_defaults():
    config = tiny_configs.llama()
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(FlaxAutoModelForCausalLM.from_config(config))
    ref = create_reference_model(policy)
    batch = {"input_ids": IDS, "attention_mask": MASK, "response_mask": np.array([[0, 0, 0, 1, 1, 1]] * 2)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))  # `trlax ppo`'s (optax's Adam raised)

    def run() -> list[np.ndarray]:
        exp = ppo.make_rollout(policy, ref)(policy.params, ref.params, batch, np.array([1.0, -1.0]), 0.2)
        trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
        copies = jax.tree_util.tree_map(np.array, trainable)  # the update donates what it trains: not the policy's
        new, _, stats = ppo.make_ppo_update(policy, tx)(copies, frozen, tx.init(trainable), exp)
        config.num_labels, config.pad_token_id = 3, 0
        classifier = FlaxAutoModelForSequenceClassification.from_config(config)
        return [np.asarray(exp["advantages"]), np.asarray(stats["loss/total"]), *map(np.asarray, jax.tree.leaves(new)),
                np.asarray(classifier(IDS, MASK, labels=np.array([0, 2])).loss),
                np.asarray(reply_mask(jax.numpy.asarray(IDS), (7, 13)))]  # the trainer's reply mask

    want = run()
    with strict():
        got = run()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_generate_makes_no_implicit_transfer(family):
    """Under jax.transfer_guard("disallow"), with the inputs on the device, generate raised XLA's "Disallowed
    host-to-device transfer": its settings were moved implicitly (jnp.asarray of Python numbers)."""
    lm = (FlaxAutoModelForSeq2SeqLM if family == "t5" else FlaxAutoModelForCausalLM).from_config(
        getattr(tiny_configs, family)())
    ids, mask, key = jax.device_put((IDS, MASK, jax.random.key(0)))
    settings = {"max_new_tokens": 3, "do_sample": True, "prng_key": key, "top_k": 5, "top_p": 0.9,
                "repetition_penalty": 1.2}
    want = np.asarray(lm.generate(ids, attention_mask=mask, **settings).sequences)
    padded = jax.device_put(np.where(MASK == 1, IDS, 3))  # without a mask: inferred from the pad id (causal)
    want_inferred = np.asarray(lm.generate(padded, pad_token_id=3, **settings).sequences)
    with jax.transfer_guard("disallow"):
        got = lm.generate(ids, attention_mask=mask, **settings).sequences
        inferred = lm.generate(padded, pad_token_id=3, **settings).sequences
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(inferred), want_inferred)
