"""Every causal type and variant: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4.

One module for the checks every family must pass (tests/parity_checks.py): logits and every hidden
state with no, right and left padding, default and explicit positions; cached decoding equal to the
full forward; save_pretrained read back by transformers; and the checkpoint's own key names.
A family's quirks live in its own test file. A new family is covered by adding its tiny config
to tests/tiny_configs.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import errors
from safetensors import safe_open

from tests.helpers import PADDINGS, batch, max_diff
from tests.parity_checks import (
    ATOL,
    SEQ,
    VOCAB,
    check_cached_decoding,
    check_forward,
    check_past_key_values,
    check_save_roundtrip,
    make_pair,
)
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax.checkpoint.naming import get_path
from trlax.errors import TrlaxError
from trlax.models.layers import Dense, Embed, HFModule, LayerNorm

CASES = {**TINY_CAUSAL, **CAUSAL_VARIANTS}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.replace("/", "-"))
    pt, model = make_pair(CASES[request.param](), folder)
    return pt, model, folder


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(case, padding, explicit_positions):
    pt, model, _ = case
    check_forward(pt, model, padding, explicit_positions)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(case, padding):
    check_cached_decoding(case[1], padding, explicit_positions=False)


def test_cached_decoding_with_explicit_positions(case):
    check_cached_decoding(case[1], "left", explicit_positions=True)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_forward_continues_its_kv_cache_as_transformers_does(case, padding):
    pt, model, _ = case
    check_past_key_values(pt, model, padding)


def test_left_pad_positions_and_the_lm_loss_match_transformers_default_attention(case):
    """A left-pad query sees no key: torch's SDPA (transformers' default) outputs zeros there, its eager attention
    (Gemma 2, BLOOM) the values' average; trlax averaged everywhere, so pad-position logits were 0.05-0.33 off and
    the LM loss of a left-padded labelled batch 2e-3 off (the last pad predicts the first real token). GPT-Neo's
    eager attention adds its padding mask to its causal one: a pad query averages the pad slots it may see."""
    pt, model, _ = case
    ids, mask = batch(VOCAB, "left", seq_len=SEQ)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                 output_hidden_states=True)
    out = model(ids, mask, labels=labels, output_hidden_states=True)
    for layer, (ref_h, h) in enumerate(zip(ref.hidden_states, out.hidden_states, strict=True)):
        assert max_diff(ref_h, h) < ATOL, f"hidden state {layer}"
    assert max_diff(ref.logits, out.logits) < ATOL
    assert abs(float(ref.loss) - float(out.loss)) < ATOL


def test_save_pretrained_loads_in_transformers(case, tmp_path):
    pt, model, _ = case
    check_save_roundtrip(pt, model, tmp_path / "saved")


@pytest.mark.parametrize("case", ["gpt2", "llama", "gemma", "opt", "phi", "cohere", "qwen3_moe", "bloom", "olmo2"],
                         indirect=True)
def test_embedding_gradient_matches_pytorch_with_the_pad_id_as_a_real_token(case):
    """The families whose transformers embedding has padding_idx=pad_token_id pass no gradient to the pad row, even
    where the pad id is a real token (pad == eos); trlax's gradient reached it (0.04 off for llama)."""
    pt, model, _ = case
    ids, mask = batch(VOCAB, "left", seq_len=SEQ)
    ids[:, -3] = model.config.pad_token_id  # attended, as an eos that is also the pad id is
    pt.zero_grad()
    logits = pt(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ((logits**2).mean(-1) * torch.tensor(mask)).sum().backward()
    name = next(n for n, p in pt.named_parameters() if p is pt.get_input_embeddings().weight)
    rule = model.key_table()[name]

    def loss(params):
        out = model.module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
        return ((out**2).mean(-1) * mask).sum()

    grad = rule.to_hf(np.asarray(get_path(jax.grad(loss)(model.params), rule.path)))
    expected = pt.get_input_embeddings().weight.grad.numpy()
    # float32 sums over the batch, sequence and vocabulary in different orders: a few 1e-6 of the largest entry
    # apart (Gemma's scaled embeddings reach 20).
    np.testing.assert_allclose(grad, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_layer_norm_variance_is_two_pass_as_torch():
    """torch computes mean((x - mean)^2); flax's default E[x^2] - E[x]^2 cancels digits when the mean is large
    against the spread (here mean 100, std 0.2: 0.1 off). Bound: a few float32 ulps of x (7.6e-6 at 100) over std."""
    class Norm(HFModule):
        @nn.compact
        def __call__(self, x):
            return self.layer_norm(1e-5)(x)

    x = (100 + 0.2 * np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32)
    norm = Norm(config=None)
    out = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x))
    exact = (x - x.astype(np.float64).mean(-1, keepdims=True)) / np.sqrt(x.astype(np.float64).var(-1, keepdims=True)
                                                                         + 1e-5)
    np.testing.assert_allclose(out, exact, atol=5e-4)


@pytest.mark.parametrize("features", [(64,), (4, 16)])  # one norm per vector; Cohere's per-head [heads, head_dim]
def test_layer_norm_gradients_match_torch(features):
    """The LayerNorm backward is a closed form (the autodiff of the two-pass variance made GPT-2-small's PPO step
    1.5x slower on XLA:CPU); its gradients are torch's in float64, to a few float32 ulps (rtol 2e-5 of each
    gradient's largest entry)."""
    class Norm(HFModule):
        @nn.compact
        def __call__(self, x):
            return self.layer_norm(1e-5, feature_axes=-1 if len(features) == 1 else (-2, -1))(x)

    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((2, 5, *features))).astype(np.float32)
    y_grad = rng.standard_normal(x.shape).astype(np.float32)
    norm = Norm(config=None)
    params = norm.init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(lambda p: p + rng.standard_normal(p.shape).astype(np.float32), params)
    (name,) = params
    x_grad, p_grad = jax.grad(lambda x, p: jnp.sum(norm.apply({"params": p}, x) * y_grad), argnums=(0, 1))(x, params)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(np.asarray(params[name]["scale"]), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(np.asarray(params[name]["bias"]), dtype=torch.float64, requires_grad=True)
    flat = torch.nn.functional.layer_norm(tx.reshape(2, 5, -1, features[-1]), (features[-1],), eps=1e-5)
    out = flat.reshape(tx.shape) * scale + bias
    (out * torch.tensor(y_grad, dtype=torch.float64)).sum().backward()
    for got, want in ((x_grad, tx.grad), (p_grad[name]["scale"], scale.grad), (p_grad[name]["bias"], bias.grad)):
        want = want.numpy()
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_layer_norm_refuses_axes_it_does_not_normalise():
    """trlax's LayerNorm normalises over the last axis; other reduction axes are an error, not a silent last-axis
    norm."""
    norm = LayerNorm(1e-5, reduction_axes=(-2, -1))
    with pytest.raises(TrlaxError, match="normalises over the last axis"):
        norm.init(jax.random.key(0), np.ones((2, 3, 4), np.float32))


def test_stored_params_are_read_without_tracing_their_initialisers():
    """Flax's `param` traced each stored param's initialiser at every trace (jax.eval_shape: over 40% of tracing a
    forward); trlax's layers read the stored value and check its shape, with Flax's own error on a mismatch."""
    calls = []

    def counted(init):
        return lambda key, shape, dtype=jnp.float32: calls.append(shape) or init(key, shape, dtype)

    class Block(HFModule):
        @nn.compact
        def __call__(self, ids):
            h = Embed(7, 4, embedding_init=counted(nn.initializers.normal(1.0)))(ids)
            h = self.layer_norm(1e-5, scale_init=counted(nn.initializers.ones))(h)
            h = self.rms_norm(1e-6)(h)
            return Dense(3, kernel_init=counted(nn.initializers.normal(1.0)))(h)

    block, ids = Block(config=None), np.array([[1, 2, 3]])
    params = block.init(jax.random.key(0), ids)["params"]
    assert calls == [(7, 4), (4,), (4, 3)]  # created once each
    want = block.apply({"params": params}, ids)
    np.testing.assert_array_equal(jax.jit(block.apply)({"params": params}, ids), want)
    assert len(calls) == 3  # and never traced again
    params["Dense_0"]["kernel"] = np.zeros((4, 5), np.float32)
    with pytest.raises(errors.ScopeParamShapeError, match=r'"kernel" in "/Dense_0".*shape \(4, 3\).*shape \(4, 5\)'):
        block.apply({"params": params}, ids)


def test_state_dict_names_are_the_checkpoints(case):
    """trlax's HF names are exactly the tensors transformers wrote (a tied head has no lm_head tensor)."""
    _, model, folder = case
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        written = set(f.keys())
    assert set(model.state_dict()) == written
