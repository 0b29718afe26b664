"""OPT's own checks; the generic parity checks over its variants are in tests/test_causal_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import batch
from tests.parity_checks import (
    ATOL,
    SEQ,
    VOCAB,
    make_pair,
)
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.opt import default_position_ids

VARIANTS = {
    "pre_ln": CAUSAL_VARIANTS["opt/pre_ln"],
    "post_ln_proj": TINY_CAUSAL["opt"],  # OPT-350m's shape: post-LN, word_embed_proj_dim 16 != hidden 32
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


def test_bare_variant_has_none_of_the_optional_params():
    """Its parity is checked in tests/test_causal_parity.py ("opt/bare"); here: the switches really bite."""
    model = FlaxAutoModelForCausalLM.from_config(CAUSAL_VARIANTS["opt/bare"]())
    params = model.params["model"]["decoder"]
    assert "final_layer_norm" not in params and "bias" not in params["layers"]["0"]["fc1"]
    assert "lm_head" in model.params


def test_value_head_input_is_after_project_out(pair):
    _, model = pair
    ids, mask = batch(VOCAB, "none", seq_len=SEQ)
    out = model(ids, mask, output_hidden_states=True)
    c = model.config
    assert out.last_hidden_state.shape == (*ids.shape, c.word_embed_proj_dim)
    assert out.hidden_states[0].shape == (*ids.shape, c.hidden_size)
    assert ("project_out" in model.params["model"]["decoder"]) is (c.word_embed_proj_dim != c.hidden_size)
    assert ("final_layer_norm" in model.params["model"]["decoder"]) is c.do_layer_norm_before
    assert "lm_head" not in model.params and "lm_head.weight" not in model.state_dict()  # tied


def test_default_positions_count_real_tokens(pair):
    """position_ids=None: left- and right-padded copies of a batch give the same logits per token."""
    _, model = pair
    ids, left_mask = batch(VOCAB, "left", seq_len=SEQ)
    _, right_mask = batch(VOCAB, "right", seq_len=SEQ)
    right_ids = np.zeros_like(ids)
    for row in range(ids.shape[0]):  # the same real tokens, moved to the front of the row
        right_ids[row, : int(right_mask[row].sum())] = ids[row, left_mask[row].astype(bool)]
    left = np.asarray(model(ids, left_mask, output_hidden_states=True).logits)
    right = np.asarray(model(right_ids, right_mask, output_hidden_states=True).logits)
    for row in range(ids.shape[0]):
        diff = left[row, left_mask[row].astype(bool)] - right[row, right_mask[row].astype(bool)]
        assert np.abs(diff).max() < ATOL


def test_default_position_ids_follow_transformers_rule():
    mask = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    expected = np.array([[-1, -1, 0, 1, 2, -1], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(default_position_ids(mask, 6, 0), expected)
    np.testing.assert_array_equal(default_position_ids(mask, 2, 3), expected[:, 3:5])


def test_layerdrop_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"layerdrop=0\.1.*config\.layerdrop = 0\.0"):
        config = TINY_CAUSAL["opt"]()
        config.layerdrop = 0.1
        FlaxAutoModelForCausalLM.from_config(config)
