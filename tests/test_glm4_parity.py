"""GLM / GLM-4 quirks (the shared parity tests run on their tiny configs and variants from
tests/test_causal_parity.py): interleaved partial rotary, the block's norms and biases, refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding, apply_rotary_pos_emb

from tests.parity_checks import check_greedy_generation
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL, glm, glm4
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.glm4 import GlmAttention, GlmModel, glm_options
from trlax.models.rope import apply_rotary

ROTARY_CASES = {"glm4": TINY_CAUSAL["glm4"],
                "full_rotary": CAUSAL_VARIANTS["glm4/unbiased_tied_full_rotary_linear_rope"],
                "yarn_head_dim16": CAUSAL_VARIANTS["glm/mha_head_dim16_yarn"]}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary_turns_adjacent_pairs_as_transformers(case):
    """GLM's cos/sin (the first half of transformers' cat(freqs, freqs), each frequency repeated twice) turn dims
    2i and 2i + 1 of the rotated part together and pass the rest through; Llama's rotate-half on the same tables
    (dims i and i + rot_dim / 2) is far off, so this check fails if trlax rotated halves."""
    config = ROTARY_CASES[case]()
    options = glm_options(config)
    d = options.head_dim
    q = np.random.default_rng(0).standard_normal((2, 5, 4, d)).astype(np.float32)  # [B, T, H, D]
    positions = np.array([[0, 1, 2, 3, 4], [3, 9, 17, 40, 63]])
    with torch.no_grad():
        cos, sin = Glm4RotaryEmbedding(config)(torch.tensor(q), torch.tensor(positions))
        ref, _ = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.zeros(2, 4, 5, d), cos, sin)
    ref = ref.transpose(1, 2).numpy()

    ours_cos, ours_sin = GlmModel(config=config).apply({}, jnp.asarray(positions), method="rotary")
    rot = int(d * options.partial_rotary_factor)
    assert ours_cos.shape == (2, 5, rot)
    out = GlmAttention(config=config, options=options).apply({}, jnp.asarray(q), ours_cos, ours_sin, method="rotate")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[..., rot:], q[..., rot:])
    rotate_half = apply_rotary(jnp.asarray(q), ours_cos, ours_sin)
    assert np.abs(np.asarray(rotate_half) - ref).max() > 0.5


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_norms_biases_and_fused_mlp_as_transformers_names_them(model_type):
    """glm4's block has four RMSNorms (glm's two); q/k/v carry biases, o_proj and the fused gate_up_proj none."""
    config = TINY_CAUSAL[model_type]()
    layer = FlaxAutoModelForCausalLM.from_config(config).params["model"]["layers"]["0"]
    post_norms = {"post_self_attn_layernorm", "post_mlp_layernorm"}
    assert post_norms <= set(layer) if model_type == "glm4" else not post_norms & set(layer)
    attn = layer["self_attn"]
    assert all("bias" in attn[name] for name in ("q_proj", "k_proj", "v_proj")) and "bias" not in attn["o_proj"]
    assert set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    assert layer["mlp"]["gate_up_proj"]["kernel"].shape == (config.hidden_size, 2 * config.intermediate_size)
    assert "bias" not in layer["mlp"]["gate_up_proj"] and "bias" not in layer["mlp"]["down_proj"]


@pytest.mark.parametrize("variant", ["glm/mha_head_dim16_yarn", "glm4/longrope"])
def test_greedy_generation_with_scaled_rope_matches_transformers(variant, tmp_path):
    check_greedy_generation(CAUSAL_VARIANTS[variant](), tmp_path)


@pytest.mark.parametrize(("rope", "message"), [
    ({"rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5},
     "rope_type 'proportional' is not supported"),
    ({"rope_type": "longrope", "partial_rotary_factor": 0.5, "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
      "original_max_position_embeddings": 32}, "needs `short_factor` with 2 numbers"),
])
def test_unsupported_rope_is_refused_at_load(rope, message):
    """A RoPE transformers' GLM runs and trlax does not implement is refused when the model is built."""
    config = glm4(rope_parameters={"rope_theta": 10000.0, **rope})
    with pytest.raises(UnsupportedModelError, match=message):
        FlaxAutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["head_dim", "num_key_value_heads"])
def test_unset_head_dim_or_kv_heads_is_refused_at_load(name):
    """GlmConfig accepts None for both; transformers' GlmAttention then fails at the first forward."""
    with pytest.raises(UnsupportedModelError, match=f"glm: {name}=None is not supported"):
        FlaxAutoModelForCausalLM.from_config(glm(**{name: None}))
