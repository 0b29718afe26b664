"""Training with a 16-bit compute dtype: every embedding table gets its gradient, and the pure forward
runs outside jit (float32 params, bfloat16 / float16 activations, as `dtype=jnp.bfloat16` loads them)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import batch
from tests.tiny_configs import TINY_CAUSAL, TINY_SEQ2SEQ
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM
from trlax.checkpoint.naming import flatten_paths
from trlax.generation import cast_weights
from trlax.models.layers import Embed

VOCAB = 101
HALF = [jnp.bfloat16, jnp.float16]
# OPT: learned positions with an offset; T5: relative-position bias tables; BART: both embeddings.
CAUSAL = ["gpt2", "llama", "opt"]
SEQ2SEQ = ["t5", "bart"]


@pytest.mark.parametrize("dtype", HALF)
def test_a_16_bit_table_lookup_has_the_float_gather_gradient(dtype):
    """The lookup gathers the table's bits as uint16 (XLA:CPU); its gradient must be nn.Embed's, bit for bit
    (the same scatter-add of the same cotangents): a bitcast has none, so it was zero."""
    ids = jnp.array([[3, 5, 3, 0], [7, 7, 7, 2]])
    table = jax.random.normal(jax.random.key(0), (9, 4), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(1), (2, 4, 4), jnp.float32).astype(dtype)

    def grad(module: nn.Module) -> np.ndarray:
        def loss(t):
            return jnp.sum(module.apply({"params": {"embedding": t}}, ids).astype(jnp.float32) * cotangent)
        return np.asarray(jax.jit(jax.grad(loss))(table))

    ours = grad(Embed(9, 4, dtype=dtype))
    np.testing.assert_array_equal(ours, grad(nn.Embed(9, 4, dtype=dtype)))
    assert np.count_nonzero(ours.any(axis=1)) == 5  # the rows looked up: 0, 2, 3, 5, 7


def _embedding_grads(model, params, inputs) -> dict[str, np.ndarray]:
    def loss(p):
        logits = model.apply(p, *inputs).logits
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
    grads = jax.jit(jax.grad(loss))(params)
    return {"/".join(path): np.asarray(leaf, np.float64) for path, leaf in flatten_paths(grads)
            if path[-1] == "embedding"}


def _inputs(model) -> tuple[np.ndarray, ...]:
    ids, mask = batch(VOCAB, "left", low=2)
    if model.is_encoder_decoder:
        dec, dmask = batch(VOCAB, "none", seq_len=5, seed=1, low=2)
        return ids, mask, dec, dmask
    return ids, mask


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", CAUSAL + SEQ2SEQ)
def test_half_precision_compute_trains_every_embedding_table(name, dtype):
    """Each table's gradient with 16-bit activations is the float32 one up to half-precision rounding. Bound:
    10% of its norm; bfloat16 keeps 8 significant bits (0.4% per rounding), and the reviewer's runs moved these
    norms by < 0.5% (torch's bfloat16 autocast: the same), while a dropped gradient is 100% off."""
    auto, config = ((FlaxAutoModelForSeq2SeqLM, TINY_SEQ2SEQ[name]()) if name in SEQ2SEQ
                    else (FlaxAutoModelForCausalLM, TINY_CAUSAL[name]()))
    full = auto.from_config(config)
    half = auto.model_class(config, dtype=dtype)
    inputs = _inputs(full)
    want = _embedding_grads(full, full.params, inputs)
    got = _embedding_grads(half, full.params, inputs)
    assert want.keys() == got.keys() and want
    for key, grad in want.items():
        assert np.linalg.norm(got[key] - grad) < 0.1 * np.linalg.norm(grad), key


@pytest.mark.parametrize("name", CAUSAL + SEQ2SEQ)
def test_bf16_pure_forward_runs_outside_jit(name):
    """`model.apply` called eagerly ran each op on its own, and XLA:CPU has no standalone bf16 x bf16 -> f32
    dot for attention's second product in the layout it asked for ("Unsupported element type for
    DotThunk")."""
    auto, config = ((FlaxAutoModelForSeq2SeqLM, TINY_SEQ2SEQ[name]()) if name in SEQ2SEQ
                    else (FlaxAutoModelForCausalLM, TINY_CAUSAL[name]()))
    full = auto.from_config(config)
    half = auto.model_class(config, dtype=jnp.bfloat16)
    inputs = _inputs(full)
    eager = np.asarray(half.apply(full.params, *inputs).logits, np.float32)
    jitted = np.asarray(jax.jit(half.apply)(full.params, *inputs).logits, np.float32)
    reference = np.asarray(full.apply(full.params, *inputs).logits)
    scale = np.abs(reference).max()
    # Both bfloat16 runs are the float32 logits up to bfloat16 rounding (2^-8 of the largest logit, a few
    # times over: the eager ops round every intermediate, the jitted program keeps fused ones in float32).
    assert np.abs(eager - reference).max() < 2**-5 * scale
    assert np.abs(jitted - reference).max() < 2**-5 * scale


def test_float16_generation_keeps_t5s_wo_in_float32_as_its_forward_does():
    """generate cast every weight matrix to the rollout dtype, T5's `wo` too, which the forward (and transformers)
    keeps float32 in a float16 T5: the rollout computed with float16-rounded `wo` (logits up to 2e-2 off)."""
    model = FlaxAutoModelForSeq2SeqLM.from_config(TINY_SEQ2SEQ["t5"](), dtype=jnp.float16, param_dtype=jnp.float16)
    cast = dict(flatten_paths(cast_weights(model.params, jnp.float16, model.spec.float32_keys)))
    wo = {path: leaf.dtype for path, leaf in cast.items() if "wo" in path}
    assert wo and set(wo.values()) == {jnp.dtype(jnp.float32)}
    others = {leaf.dtype for path, leaf in cast.items() if leaf.ndim >= 2 and "wo" not in path}
    assert others == {jnp.dtype(jnp.float16)}
    bf16 = dict(flatten_paths(cast_weights(model.params, jnp.bfloat16, model.spec.float32_keys)))
    assert {bf16[path].dtype for path in wo} == {jnp.dtype(jnp.bfloat16)}  # the float32 rule is float16's only
