"""Phi (phi-1, phi-1.5, phi-2): trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from tests.helpers import PADDINGS
from tests.parity_checks import check_cached_decoding, check_forward, check_save_roundtrip, make_pair
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.phi import rotary_inv_freq


def _phi2_like() -> transformers.PhiConfig:
    # Phi-2's own switches: multi-head attention, no q/k LayerNorm; a quarter of each head rotated, linear scaling.
    config = TINY_CAUSAL["phi"]()
    config.num_key_value_heads, config.qk_layernorm = 4, False
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.25}
    return config


VARIANTS = {"gqa_qk_layernorm": TINY_CAUSAL["phi"], "mha_linear_rope": _phi2_like}


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


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    check_save_roundtrip(*pair, tmp_path / "saved")


def test_variants_set_what_they_claim(pair):
    pt, model = pair
    config = model.config
    assert config.rope_parameters["partial_rotary_factor"] < 1.0
    assert pt.model.layers[0].self_attn.rotary_ndims == 2 * len(rotary_inv_freq(config)) < config.hidden_size // 4
    assert ("q_layernorm" in model.params["model"]["layers"]["0"]["self_attn"]) is config.qk_layernorm


def test_inv_freq_equals_transformers_within_two_ulps(pair):
    """2 ulps, not bit equality: see tests/test_llama_parity.py (float32 pow differs between vector kernels)."""
    pt, model = pair
    np.testing.assert_array_max_ulp(rotary_inv_freq(model.config), pt.model.rotary_emb.inv_freq.numpy(), maxulp=2)


def test_lm_head_has_its_bias(pair):
    pt, model = pair
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]["bias"]), pt.lm_head.bias.detach().numpy())
    assert "lm_head.bias" in model.state_dict()


def test_tied_embeddings_are_refused():
    config = TINY_CAUSAL["phi"]()
    config.tie_word_embeddings = True
    with pytest.raises(UnsupportedModelError, match="phi with tie_word_embeddings=True"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_unsupported_rope_type_is_refused():
    config = TINY_CAUSAL["phi"]()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        FlaxAutoModelForCausalLM.from_config(config)
