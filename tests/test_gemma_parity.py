"""Gemma and Gemma 2: trlax vs transformers (PyTorch), float32, atol 1e-4.

The checks are the Llama family's (tests/test_llama_parity.py); this file adds Gemma's own:
the (1 + w) RMSNorm, the embedding scale, soft-capping, and the refusals.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import torch_random_init
from tests.parity_checks import check_forward, make_pair
from tests.test_llama_parity import check_window_matters
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.layers import RMSNorm

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")


def test_gemma2_sliding_window_and_softcaps_are_exercised():
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL["gemma2"]()))
    check_window_matters(pt)
    ids = torch.arange(11)[None] % 101
    with torch.no_grad():
        logits = pt(ids).logits
        pt.config.final_logit_softcapping = None
        uncapped = pt(ids).logits
    cap = TINY_CAUSAL["gemma2"]().final_logit_softcapping
    assert float(uncapped.abs().max()) > cap > float(logits.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_offset_rms_norm_equals_gemma_rms_norm(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype) * 3
    ref = GemmaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16, generator=gen) * 0.5)
        expected = ref(x)
    jdtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    norm = RMSNorm(eps=1e-6, dtype=jdtype, add_unit_offset=True)
    params = {"params": {"scale": jnp.asarray(ref.weight.detach().numpy())}}
    got = norm.apply(params, jnp.asarray(x.float().numpy()).astype(jdtype))
    assert got.dtype == jdtype
    # Same formula and rounding points; rsqrt/mean may differ in the last bit of the dtype.
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected.float().numpy(), rtol=2 * ulp, atol=0)


def test_embedding_scale_is_rounded_to_the_compute_dtype():
    # HF multiplies by sqrt(hidden) cast to the weights' dtype: 55.4256 becomes 55.5 in bfloat16.
    assert float(jnp.asarray(3072**0.5, jnp.bfloat16)) == 55.5


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3_text", "llama"])
@pytest.mark.parametrize("flag", [{"use_bidirectional_attention": True}, {"is_causal": False}])
def test_bidirectional_config_is_refused(name, flag):
    config = TINY_CAUSAL[name]()
    for key, value in flag.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModelError, match="bidirectional attention"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_gemma_with_unsupported_rope_is_refused():
    config = TINY_CAUSAL["gemma2"]()
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="rope_type 'proportional'"):
        FlaxAutoModelForCausalLM.from_config(config)


# --- Gemma 3 -----------------------------------------------------------------------------------


def _gemma3_pt(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch_random_init(transformers.AutoModelForCausalLM.from_config(config))


def test_gemma3_sliding_window_and_logit_softcap_are_exercised():
    pt = _gemma3_pt(TINY_CAUSAL["gemma3_text"]())
    check_window_matters(pt)
    ids = torch.arange(11)[None] % 101
    with torch.no_grad():
        logits = pt(ids).logits
        pt.config.final_logit_softcapping = None
        uncapped = pt(ids).logits
    assert float(uncapped.abs().max()) > 3.0 > float(logits.abs().max())


def test_gemma3_layer_types_rotate_with_their_own_rope_parameters(tmp_path):
    """Each layer type's inverse frequencies are transformers' (2 ulps: see test_llama_parity), and differ."""
    pt, model = make_pair(TINY_CAUSAL["gemma3_text"](), tmp_path)
    inv_freq = model.module.bind({"params": model.params}).model.inv_freq
    assert sorted(inv_freq) == ["full_attention", "sliding_attention"]
    for layer_type, ours in inv_freq.items():
        np.testing.assert_array_max_ulp(np.asarray(ours), getattr(pt.model.rotary_emb, f"{layer_type}_inv_freq")
                                        .numpy(), maxulp=2)
    assert not np.allclose(inv_freq["full_attention"], inv_freq["sliding_attention"])


def test_gemma3_given_a_flat_rope_dict_uses_the_per_layer_type_entries_as_transformers(tmp_path):
    """transformers keeps a flat rope_parameters dict beside the per-layer-type entries it adds, and reads only
    those; trlax applied the flat linear / theta-1000 settings to every layer (logits off by up to 8)."""
    config = TINY_CAUSAL["gemma3_text"]()
    config = transformers.Gemma3TextConfig(**{**config.to_dict(), "rope_parameters": {
        "rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}})
    assert {"full_attention", "rope_type"} <= set(config.rope_parameters)
    pt, model = make_pair(config, tmp_path)
    check_forward(pt, model, "left", explicit_positions=False)


def test_gemma3_attention_softcap_is_ignored_as_transformers_does(tmp_path):
    """transformers 5's Gemma 3 attention never passes `attn_logit_softcapping` on; trlax matches it. If a
    later transformers starts applying it, the first assertion fails and trlax must follow."""
    config = TINY_CAUSAL["gemma3_text"]()
    config.attn_logit_softcapping = 0.5
    pt = _gemma3_pt(config)
    ids = torch.arange(11)[None] % 101
    with torch.no_grad():
        capped = pt(ids).logits
        pt.config.attn_logit_softcapping = None
        assert torch.equal(capped, pt(ids).logits)
    pt.config.attn_logit_softcapping = 0.5
    folder = tmp_path / "capped"
    pt.save_pretrained(str(folder))
    check_forward(pt, FlaxAutoModelForCausalLM.from_pretrained(folder), "left", explicit_positions=False)


def test_gemma3_with_unsupported_rope_is_refused():
    config = TINY_CAUSAL["gemma3_text"]()
    config.rope_parameters["full_attention"] = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="rope_type 'proportional'"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_gemma3_with_a_partial_rotary_factor_transformers_cannot_run_is_refused():
    """A linear full-attention RoPE with partial_rotary_factor: transformers' forward fails on the shapes; trlax ran
    it (Llama-like families refuse it)."""
    config = TINY_CAUSAL["gemma3_text"]()
    config.rope_parameters["full_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5 with rope_type 'linear'"):
        FlaxAutoModelForCausalLM.from_config(config)
