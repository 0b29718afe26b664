"""StarCoder2 quirks (the shared parity tests run on it from tests/test_llama_parity.py)."""

from __future__ import annotations

import numpy as np

from tests.parity_checks import check_cached_decoding, check_forward, make_pair
from tests.tiny_configs import TINY_CAUSAL


def test_without_biases_matches_pytorch(tmp_path):
    config = TINY_CAUSAL["starcoder2"]()
    config.use_bias, config.tie_word_embeddings, config.sliding_window = False, False, None
    pt, model = make_pair(config, tmp_path)
    layer = model.params["model"]["layers"]["0"]
    assert "bias" not in layer["self_attn"]["q_proj"] and "bias" not in layer["mlp"]["c_fc"]
    assert "bias" in layer["input_layernorm"]  # LayerNorms keep their bias whatever use_bias says
    check_forward(pt, model, "left", explicit_positions=False)
    check_cached_decoding(model, "left", explicit_positions=False)


def test_norms_are_layer_norms_with_bias(tmp_path):
    pt, model = make_pair(TINY_CAUSAL["starcoder2"](), tmp_path)
    np.testing.assert_array_equal(model.params["model"]["norm"]["bias"], pt.model.norm.bias.detach().numpy())
    np.testing.assert_array_equal(model.params["model"]["layers"]["1"]["post_attention_layernorm"]["scale"],
                                  pt.model.layers[1].post_attention_layernorm.weight.detach().numpy())
