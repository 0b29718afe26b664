"""Phi (phi-1, phi-1.5, phi-2): trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity_checks import make_pair
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.rope import partial_inv_frequencies
from trlax.models.self_attention import head_dim_of

VARIANTS = {"gqa_qk_layernorm": TINY_CAUSAL["phi"], "mha_linear_rope": CAUSAL_VARIANTS["phi/mha_linear_rope"],
            "tied": CAUSAL_VARIANTS["phi/tied"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


def test_variants_set_what_they_claim(pair):
    pt, model = pair
    config = model.config
    assert config.rope_parameters["partial_rotary_factor"] < 1.0
    inv_freq = partial_inv_frequencies(config, head_dim_of(config))
    assert pt.model.layers[0].self_attn.rotary_ndims == 2 * len(inv_freq) < config.hidden_size // 4
    assert ("q_layernorm" in model.params["model"]["layers"]["0"]["self_attn"]) is config.qk_layernorm


def test_inv_freq_equals_transformers_within_two_ulps(pair):
    """2 ulps, not bit equality: see tests/test_llama_parity.py (float32 pow differs between vector kernels)."""
    pt, model = pair
    inv_freq = partial_inv_frequencies(model.config, head_dim_of(model.config))
    np.testing.assert_array_max_ulp(inv_freq, pt.model.rotary_emb.inv_freq.numpy(), maxulp=2)


def test_lm_head_has_its_bias_also_when_tied(pair):
    """transformers ties only lm_head.weight: the bias stays its own tensor (trlax refused a tied Phi)."""
    pt, model = pair
    tied = model.config.tie_word_embeddings
    assert set(model.params["lm_head"]) == ({"bias"} if tied else {"kernel", "bias"})
    assert "lm_head.bias" in model.state_dict() and ("lm_head.weight" in model.state_dict()) is not tied
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]["bias"]), pt.lm_head.bias.detach().numpy())


def test_unsupported_rope_type_is_refused():
    config = TINY_CAUSAL["phi"]()
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="rope_type 'proportional'"):
        FlaxAutoModelForCausalLM.from_config(config)
