"""Phi-3 quirks (the shared parity tests run on it from tests/test_llama_parity.py): fused projections,
partial rotary, and the RoPE scaling trlax refuses."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from tests.helpers import save_torch
from tests.parity_checks import check_forward, make_pair
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(TINY_CAUSAL["phi3"](), tmp_path_factory.mktemp("phi3"))


def test_fused_kernels_keep_the_transformers_layout(pair):
    """qkv_proj ([q | k | v]) and gate_up_proj ([gate | up]) kernels are torch's weights transposed."""
    pt, model = pair
    layer = model.params["model"]["layers"]["0"]
    state = pt.state_dict()
    np.testing.assert_array_equal(layer["self_attn"]["qkv_proj"]["kernel"],
                                  state["model.layers.0.self_attn.qkv_proj.weight"].numpy().T)
    np.testing.assert_array_equal(layer["mlp"]["gate_up_proj"]["kernel"],
                                  state["model.layers.0.mlp.gate_up_proj.weight"].numpy().T)


def test_partial_rotary_is_what_transformers_uses(pair):
    pt, model = pair
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.75
    inv_freq = pt.model.rotary_emb.inv_freq.numpy()
    assert 2 * len(inv_freq) == 6 < model.config.hidden_size // model.config.num_attention_heads
    np.testing.assert_array_max_ulp(np.asarray(model.module.bind({"params": model.params}).model.inv_freq),
                                    inv_freq, maxulp=2)


def test_full_rotary_phi3_mini_shape_matches_pytorch(tmp_path):
    config = TINY_CAUSAL["phi3"]()
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}
    config.sliding_window = None
    check_forward(*make_pair(config, tmp_path), "left", explicit_positions=False)


@pytest.mark.parametrize("kind", ["longrope", "su", "yarn"])
def test_longrope_scaling_is_refused_naming_it(kind, tmp_path):
    """Phi-3-128k / Phi-3.5 / Phi-4-mini configs: transformers maps 'su' and 'yarn' to 'longrope'."""
    config = TINY_CAUSAL["phi3"]().to_dict()
    config.pop("rope_parameters")
    config["rope_scaling"] = {"type": kind, "short_factor": [1.0] * 3, "long_factor": [2.0] * 3,
                              "partial_rotary_factor": 0.75}
    config["original_max_position_embeddings"] = 32
    config = transformers.Phi3Config.from_dict(config)
    assert config.rope_parameters["rope_type"] == "longrope"
    save_torch(transformers.AutoModelForCausalLM.from_config(config), tmp_path)  # transformers runs it
    with pytest.raises(UnsupportedModelError, match="phi3 with RoPE scaling rope_type='longrope'"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
