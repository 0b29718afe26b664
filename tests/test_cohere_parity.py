"""Cohere: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4; its own quirks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.parity_checks import (
    check_greedy_generation,
    make_pair,
)
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL, cohere_with
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.rope import apply_rotary, inv_frequencies, rotary_cos_sin

VARIANTS = {"qk_norm_gqa_untied": TINY_CAUSAL["cohere"], "tied_linear_rope": CAUSAL_VARIANTS["cohere/tied_linear_rope"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("variant", ["tied_linear_rope"])  # the tiny_configs entry runs in tests/test_generation.py
def test_greedy_generation_matches_transformers(variant, tmp_path):
    check_greedy_generation(VARIANTS[variant](), tmp_path)


def test_variants_set_what_they_claim(pair):
    pt, model = pair
    c = model.config
    attn = model.params["model"]["layers"]["0"]["self_attn"]
    assert ("q_norm" in attn) is c.use_qk_norm and ("lm_head" in model.params) is not c.tie_word_embeddings
    if c.use_qk_norm:  # one weight row per head
        assert attn["q_norm"]["scale"].shape == (c.num_attention_heads, 8)
        assert attn["k_norm"]["scale"].shape == (c.num_key_value_heads, 8)
        assert "bias" not in attn["q_norm"] and "bias" in attn["q_proj"]
    assert c.logit_scale != 1.0 and "bias" not in model.params["model"]["norm"]


def test_interleaved_rotary_equals_transformers():
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding, apply_rotary_pos_emb

    config = VARIANTS["tied_linear_rope"]()
    q = np.random.RandomState(0).randn(2, 5, 4, 8).astype(np.float32)  # [B, T, H, D]
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 30, 63]])
    rotary = CohereRotaryEmbedding(config)
    cos, sin = rotary(torch.tensor(q), torch.tensor(positions))  # [B, T, D] each frequency twice
    # The layout: the same cos/sin in, the same rotation out.
    ref, _ = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.zeros(2, 4, 5, 8), cos, sin)
    out = apply_rotary(q, cos.numpy(), sin.numpy(), interleaved=True)
    np.testing.assert_allclose(np.asarray(out), ref.transpose(1, 2).numpy(), atol=1e-6)
    # The tables: from the same inverse frequencies (float32 pow may differ by an ulp; see the NeoX test).
    np.testing.assert_array_max_ulp(inv_frequencies(config, 8), rotary.inv_freq.numpy(), maxulp=2)
    ours = rotary_cos_sin(positions, rotary.inv_freq.numpy(), interleaved=True)
    np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=1e-6)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"logit_scale": None}, "logit_scale=None is not supported"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'proportional'"),
])
def test_unsupported_options_are_refused(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLM.from_config(cohere_with(**overrides))
