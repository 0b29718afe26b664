"""GPT-NeoX (Pythia): trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import batch, max_diff
from tests.parity_checks import (
    SEQ,
    VOCAB,
    check_forward,
    make_pair,
)
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.gpt_neox import rotary_inv_freq

VARIANTS = {
    "parallel_rot25": TINY_CAUSAL["gpt_neox"],  # Pythia's shape
    "sequential_rot100": CAUSAL_VARIANTS["gpt_neox/sequential_rot100"],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


def test_variants_set_what_they_claim():
    """Guards against a config field being silently dropped by the v5 config class."""
    pythia, other = TINY_CAUSAL["gpt_neox"](), VARIANTS["sequential_rot100"]()
    assert pythia.rope_parameters["partial_rotary_factor"] == 0.25 and pythia.use_parallel_residual
    assert other.rope_parameters == {"rope_theta": 500, "partial_rotary_factor": 1.0, "rope_type": "default"}
    assert not other.use_parallel_residual and other.tie_word_embeddings and not other.attention_bias


def test_inv_freq_equals_transformers_within_two_ulps():
    """2 ulps, not bit equality: see tests/test_llama_parity.py (float32 pow differs between vector kernels)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    for make in VARIANTS.values():
        config = make()
        ref = GPTNeoXRotaryEmbedding(config).inv_freq.numpy()
        np.testing.assert_array_max_ulp(rotary_inv_freq(config), ref, maxulp=2)


def test_fused_qkv_keeps_the_transformers_layout(pair):
    """query_key_value's kernel is torch's weight transposed, nothing more (per-head [q|k|v] blocks)."""
    pt, model = pair
    kernel = np.asarray(model.params["gpt_neox"]["layers"]["0"]["attention"]["query_key_value"]["kernel"])
    ref = pt.state_dict()["gpt_neox.layers.0.attention.query_key_value.weight"].numpy()
    np.testing.assert_array_equal(kernel, ref.T)


def test_legacy_buffers_in_a_checkpoint_are_ignored(pair, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, model = pair
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
    tensors["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = rotary_inv_freq(model.config)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch(VOCAB, "none", seq_len=SEQ)
    out = model(ids, mask, output_hidden_states=True).logits
    assert max_diff(out, again(ids, mask, output_hidden_states=True).logits) == 0.0


def test_dynamic_ntk_rope_on_the_rotated_quarter_matches_transformers(tmp_path):
    """Dynamic NTK with partial rotary: a call past max_position_embeddings (SEQ = 11 > 8) rotates the first
    quarter of each head with the frequencies of its length, their dim the rotated width."""
    config = TINY_CAUSAL["gpt_neox"]()
    config.max_position_embeddings = 8
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.25}
    check_forward(*make_pair(config, tmp_path), "left", explicit_positions=False)


def test_unsupported_rope_type_is_refused():
    config = TINY_CAUSAL["gpt_neox"]()
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.25}
    with pytest.raises(UnsupportedModelError, match="rope_type 'proportional'"):
        FlaxAutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("stray", [8, 32])
def test_a_stray_head_dim_is_refused(stray):
    """GPTNeoXConfig has no head_dim: transformers sizes the rotary frequencies from a stray one while its
    attention uses hidden_size // heads (logits 1.2-1.6 off trlax's), so trlax refuses it; the true size loads."""
    config = TINY_CAUSAL["gpt_neox"]()
    config.head_dim = config.hidden_size // config.num_attention_heads
    FlaxAutoModelForCausalLM.from_config(config)
    config.head_dim = stray
    with pytest.raises(UnsupportedModelError, match=f"head_dim={stray}.*remove head_dim"):
        FlaxAutoModelForCausalLM.from_config(config)
