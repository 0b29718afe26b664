"""BLOOM: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4; ALiBi's own checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import batch, max_diff
from tests.parity_checks import (
    SEQ,
    VOCAB,
    check_forward,
    check_greedy_generation,
    make_pair,
)
from tests.tiny_configs import TINY_CAUSAL, bloom_post_ln_untied
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.attention import alibi_bias, alibi_slopes

VARIANTS = {"alibi_6heads_tied": TINY_CAUSAL["bloom"], "post_ln_8heads_untied": bloom_post_ln_untied}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(variant, tmp_path):
    check_greedy_generation(VARIANTS[variant](), tmp_path)


def test_position_ids_are_ignored_as_transformers_ignores_them(pair):
    """ALiBi reads positions from the mask: explicit position_ids change nothing, here or in PyTorch."""
    pt, model = pair
    ids, mask = batch(VOCAB, "left", seq_len=SEQ)
    odd = np.broadcast_to(np.arange(SEQ)[::-1] * 3, ids.shape)
    check_forward(pt, model, "left", explicit_positions=True)
    assert max_diff(model(ids, mask).logits, model(ids, mask, position_ids=odd).logits) == 0.0


def test_left_padding_does_not_move_positions(pair):
    """A row's logits are the same with or without left pads in front (positions come from the mask)."""
    _, model = pair
    ids, _ = batch(VOCAB, "none", batch_size=1, seq_len=SEQ, low=2)
    padded = np.concatenate([np.full((1, 4), 7), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 4), int), np.ones_like(ids)], axis=1)
    alone = model(ids, np.ones_like(ids)).logits
    assert max_diff(alone, np.asarray(model(padded, mask).logits)[:, 4:]) < 1e-5


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12, 71, 112])
def test_alibi_equals_transformers(heads):
    """Slopes within 1 ulp of torch's pow (its vector kernel rounds differently), biases within float32 noise."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

    np.testing.assert_array_max_ulp(alibi_slopes(heads), _get_alibi_slopes(heads, "cpu").numpy(), maxulp=1)
    _, mask = batch(VOCAB, "left", seq_len=SEQ)
    mask[1, 4] = 0  # a hole in the middle counts too
    ref = build_alibi_tensor(torch.tensor(mask), heads, torch.float32).reshape(len(mask), heads, 1, SEQ)
    np.testing.assert_allclose(np.asarray(alibi_bias(mask, alibi_slopes(heads))), ref.numpy(), rtol=1e-6)


def test_fused_qkv_keeps_the_transformers_layout(pair):
    pt, model = pair
    kernel = np.asarray(model.params["transformer"]["h"]["0"]["self_attention"]["query_key_value"]["kernel"])
    np.testing.assert_array_equal(kernel, pt.state_dict()["transformer.h.0.self_attention.query_key_value.weight"].T)


def test_slow_but_exact_is_refused():
    with pytest.raises(UnsupportedModelError, match="slow_but_exact=True with pretraining_tp=4"):
        FlaxAutoModelForCausalLM.from_config(bloom_post_ln_untied(slow_but_exact=True))
