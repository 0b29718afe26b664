"""OPT: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from tests.helpers import PADDINGS, batch
from tests.parity_checks import (
    ATOL,
    SEQ,
    VOCAB,
    check_cached_decoding,
    check_forward,
    check_save_roundtrip,
    make_pair,
)
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.opt import default_position_ids


def _pre_ln(**overrides: object) -> transformers.OPTConfig:
    config = TINY_CAUSAL["opt"]()
    config.do_layer_norm_before = True
    config.word_embed_proj_dim = config.hidden_size
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


VARIANTS = {
    # OPT-125m's shape: pre-LN, tied head, embeddings in the hidden size.
    "pre_ln": _pre_ln,
    # OPT-350m's shape: post-LN (no final layer norm), word_embed_proj_dim 16 != hidden 32.
    "post_ln_proj": TINY_CAUSAL["opt"],
}


def _bare() -> transformers.OPTConfig:
    """Every other switch: projected pre-LN, no biases, no LayerNorm params, no final norm, untied head."""
    return _pre_ln(word_embed_proj_dim=16, enable_bias=False, layer_norm_elementwise_affine=False,
                   _remove_final_layer_norm=True, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(pair, padding, explicit_positions):
    check_forward(*pair, padding, explicit_positions)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(pair, padding):
    check_cached_decoding(pair[1], padding, explicit_positions=False)


def test_cached_decoding_with_explicit_positions(pair):
    check_cached_decoding(pair[1], "left", explicit_positions=True)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    check_save_roundtrip(*pair, tmp_path / "saved")


def test_bare_variant_matches_pytorch_and_round_trips(tmp_path):
    pt, model = make_pair(_bare(), tmp_path / "torch")
    params = model.params["model"]["decoder"]
    assert "final_layer_norm" not in params and "bias" not in params["layers"]["0"]["fc1"]
    assert "lm_head" in model.params
    check_forward(pt, model, "left", explicit_positions=False)
    check_save_roundtrip(pt, model, tmp_path / "saved")


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
        FlaxAutoModelForCausalLM.from_config(_pre_ln(layerdrop=0.1))
