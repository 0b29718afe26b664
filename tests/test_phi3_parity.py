"""Phi-3 quirks (the shared parity tests run on it from tests/test_llama_parity.py): fused projections,
partial rotary, and LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini) on both sides of its pretraining length."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity_checks import SEQ, check_forward, check_greedy_generation, make_pair
from tests.tiny_configs import TINY_CAUSAL, phi3_longrope
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.rope import attention_scaling


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
def test_longrope_frequencies_and_attention_factor_are_transformers(kind):
    """Phi-3-128k / Phi-3.5 / Phi-4-mini configs (transformers maps 'su' and 'yarn' to 'longrope') were refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = phi3_longrope(kind)
    assert config.rope_parameters["rope_type"] == "longrope"
    model = FlaxAutoModelForCausalLM.from_config(config)
    table = model.module.bind({"params": model.params}).model.inv_freq
    short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=33)
    np.testing.assert_array_max_ulp(table.short, short.numpy(), maxulp=2)
    np.testing.assert_array_max_ulp(table.long, long.numpy(), maxulp=2)
    assert table.original_max_position_embeddings == 32
    assert attention_scaling(config) == pytest.approx(scaling, rel=1e-12) and scaling > 1.0


def test_longrope_on_both_sides_of_the_pretraining_length_matches_transformers(tmp_path):
    """A forward pass whose last position passes the pretraining length rotates every position with the long
    factors, one within it with the short ones, as transformers does. Greedy generation matches token for token
    within it, from prompts past it, where only the longest prompt's last token passes it (trlax's prompt pass
    left that token out and took the short factors), and across it: transformers' Phi-3 drops its KV cache and
    recomputes every position at the step whose input first holds the pretraining length + 1 tokens, and so does
    trlax (generation past it was refused)."""
    past = phi3_longrope(original=8)  # the 11-token test sequences pass it
    pt, model = make_pair(past, tmp_path / "past")
    for padding in ("none", "left", "right"):
        check_forward(pt, model, padding, explicit_positions=False)
    # within; prompts past it; the longest prompt one past it; crossing at the 1st, 3rd and last new token
    for original in (SEQ + 7, 8, SEQ - 1, SEQ, SEQ + 2, SEQ + 6):
        check_greedy_generation(phi3_longrope(original=original), tmp_path / f"generate{original}", new_tokens=8)


def test_longrope_factors_of_the_wrong_length_are_refused():
    config = phi3_longrope()
    config.rope_parameters["long_factor"] = [2.0, 4.4]
    with pytest.raises(UnsupportedModelError, match="needs `long_factor` with 3 numbers"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_the_longrope_cache_rebuild_computes_the_last_positions_logits_only():
    """The rebuild step ran the LM head over every position ([B, T + at, V] float32: ~26 GB for Phi-4-mini at batch
    8 and 4097 tokens) to read the last row; the prompt pass already avoided that."""
    model = FlaxAutoModelForCausalLM.from_config(phi3_longrope(original=SEQ + 2))  # rebuild at new token 3: 14 slots
    model.generate(np.full((3, SEQ), 5, np.int32), max_new_tokens=8)
    text = model.generation_cache.compiled_text()
    assert "conditional" in text  # the rebuild branch is in the program
    assert "f32[42,101]" not in text and "f32[3,14,101]" not in text
