"""GPT-J: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4; its rotary and head quirks."""

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
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL, gptj_with
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.gptj import rotary_inv_freq
from trlax.models.rope import apply_rotary, rotary_cos_sin

VARIANTS = {"rot4_untied": TINY_CAUSAL["gptj"], "rot8_tied": CAUSAL_VARIANTS["gptj/rot8_tied"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("variant", ["rot8_tied"])  # the tiny_configs entry runs in tests/test_generation.py
def test_greedy_generation_matches_transformers(variant, tmp_path):
    check_greedy_generation(VARIANTS[variant](), tmp_path)


@pytest.mark.parametrize("rope", [{"rope_theta": 100.0}, {"rope_scaling": {"type": "linear", "factor": 4.0}}])
def test_rope_fields_are_ignored_as_transformers_does(rope, tmp_path):
    """transformers' GPT-J rotates with base 10000 and no scaling whatever the config says; trlax read the fields."""
    config = TINY_CAUSAL["gptj"]()
    for key, value in rope.items():
        setattr(config, key, value)
    pt, model = make_pair(config, tmp_path)
    check_forward(pt, model, "left", explicit_positions=False)


def test_head_bias_is_its_own_tensor_when_tied(pair):
    pt, model = pair
    tied = model.config.tie_word_embeddings
    assert set(model.params["lm_head"]) == ({"bias"} if tied else {"kernel", "bias"})
    assert "lm_head.bias" in model.state_dict() and ("lm_head.weight" in model.state_dict()) is not tied
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]["bias"]), pt.lm_head.bias.detach().numpy())


def test_interleaved_rotary_equals_transformers():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    config = TINY_CAUSAL["gptj"]()
    x = np.random.RandomState(0).randn(2, 5, 3, config.rotary_dim).astype(np.float32)  # [B, T, H, rot]
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 30, 63]])
    sin, cos = torch.split(create_sinusoidal_positions(64, config.rotary_dim)[positions], config.rotary_dim // 2, -1)
    ref = apply_rotary_pos_emb(torch.tensor(x), sin, cos).numpy()
    out = apply_rotary(x, *rotary_cos_sin(positions, rotary_inv_freq(config), interleaved=True), interleaved=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)


def test_legacy_buffers_in_a_checkpoint_are_ignored(pair, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, model = pair
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
    tensors["transformer.h.0.attn.masked_bias"] = np.array(-1e9, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch(VOCAB, "none", seq_len=SEQ)
    assert max_diff(model(ids, mask).logits, again(ids, mask).logits) == 0.0


@pytest.mark.parametrize("rotary_dim", [16, 5, 0])
def test_rotary_dim_outside_the_head_or_odd_is_refused(rotary_dim):
    with pytest.raises(UnsupportedModelError, match=f"rotary_dim={rotary_dim} must be even and in"):
        FlaxAutoModelForCausalLM.from_config(gptj_with(rotary_dim=rotary_dim))
