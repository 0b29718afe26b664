"""OLMo 2 / OLMo 3 quirks (the shared parity tests run on their tiny configs and variants from
tests/test_causal_parity.py): q/k norms over all heads at once, OLMo's float32 rounding order, refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm, apply_rotary_pos_emb

from tests.parity_checks import SEQ, check_forward, check_greedy_generation, make_pair
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import TrlaxError, UnsupportedModelError
from trlax.models.layers import RMSNorm
from trlax.models.olmo2 import Olmo2Attention, olmo2_options
from trlax.models.rope import apply_rotary, base_inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import head_dim_of

HEAD_NORM_CASES = {"olmo2": TINY_CAUSAL["olmo2"], "head_dim16": CAUSAL_VARIANTS["olmo2/bias_mha_head_dim16_tied"]}


@pytest.mark.parametrize("case", list(HEAD_NORM_CASES))
def test_q_and_k_norms_span_all_heads(case, tmp_path):
    """q_norm / k_norm normalise a token's whole projection [Hq * D] / [Hkv * D] with one statistic, as
    Olmo2Attention does; a per-head RMSNorm (Qwen3's) with the same weights is more than 0.1 off on these inputs."""
    pt, model = make_pair(HEAD_NORM_CASES[case](), tmp_path)
    c = model.config
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, head_dim_of(c)
    params = model.params["model"]["layers"]["0"]["self_attn"]
    assert params["q_norm"]["scale"].shape == (hq * d,) and params["k_norm"]["scale"].shape == (hkv * d,)
    x = np.random.default_rng(0).standard_normal((2, 5, c.hidden_size)).astype(np.float32)
    attn = Olmo2Attention(config=c, options=olmo2_options(c))
    q, k, _ = attn.apply({"params": params}, jnp.asarray(x), method="project_qkv")
    torch_attn = pt.model.layers[0].self_attn
    with torch.no_grad():
        ref_q = torch_attn.q_norm(torch_attn.q_proj(torch.tensor(x))).numpy()
        ref_k = torch_attn.k_norm(torch_attn.k_proj(torch.tensor(x))).numpy()
        raw_q = torch_attn.q_proj(torch.tensor(x)).numpy().reshape(2, 5, hq, d)
    np.testing.assert_allclose(np.asarray(q).reshape(2, 5, -1), ref_q, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(k).reshape(2, 5, -1), ref_k, atol=1e-5, rtol=0)
    per_head = raw_q / np.sqrt(np.mean(raw_q**2, axis=-1, keepdims=True) + c.rms_norm_eps)
    per_head = per_head * np.asarray(params["q_norm"]["scale"]).reshape(hq, d)
    assert np.abs(per_head.reshape(2, 5, -1) - ref_q).max() > 0.1


def assert_rounds_as(out: np.ndarray, ref: np.ndarray) -> None:
    """bfloat16 results (as float32) of the same rounding order: equal but where a float32 ulp between XLA's and
    torch's kernels (rsqrt, a fused multiply-add on AVX-512) crosses a bfloat16 rounding boundary, and there one
    bfloat16 ulp (2^-7 relative at most) apart. A different order differs in a quarter of the entries."""
    assert (out == ref).mean() >= 0.99
    np.testing.assert_array_less(np.abs(out - ref), np.abs(ref) * 2.0**-7 + 1e-30)


def test_rms_norm_rounds_as_olmo_in_bfloat16():
    """Olmo2RMSNorm multiplies its weight in float32 and casts after; trlax's `float32_weight` norm rounds as it does
    in bfloat16 (Llama's order, cast then multiply, differs in a quarter of the entries)."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((4, 9, 64))).astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(64)).astype(np.float32)
    torch_norm = Olmo2RMSNorm(64, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        torch_norm.weight.copy_(torch.tensor(w))
        ref = torch_norm(torch.tensor(x).to(torch.bfloat16)).float().numpy()
    params = {"params": {"scale": jnp.asarray(w, jnp.bfloat16)}}

    def run(float32_weight: bool) -> np.ndarray:
        norm = RMSNorm(1e-5, jnp.bfloat16, jnp.bfloat16, float32_weight=float32_weight)
        return np.asarray(norm.apply(params, jnp.asarray(x, jnp.bfloat16)), np.float32)

    assert_rounds_as(run(True), ref)
    assert (run(False) != ref).mean() > 0.1


def test_rotary_runs_in_float32_in_bfloat16():
    """OLMo's cos/sin stay float32, so bfloat16 q/k rotate in float32 and are cast back: trlax rounds as transformers'
    apply_rotary_pos_emb does (rotating in bfloat16, as Llama does, differs in a quarter of the entries)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(3 * rng.standard_normal((4, 9, 4, 16)), jnp.bfloat16)  # [B, T, H, D]
    cos, sin = rotary_cos_sin(jnp.asarray(np.tile(np.arange(9) * 7, (4, 1))), base_inv_frequencies(1e4, 16))
    q_torch = torch.tensor(np.asarray(q, np.float32)).to(torch.bfloat16).transpose(1, 2)  # [B, H, T, D]
    ref, _ = apply_rotary_pos_emb(q_torch, q_torch, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    ref = ref.transpose(1, 2).float().numpy()
    config = TINY_CAUSAL["olmo2"]()
    attn = Olmo2Attention(config=config, options=olmo2_options(config), dtype=jnp.bfloat16)
    out = attn.apply({}, q, cos, sin, method="rotate")
    assert out.dtype == jnp.bfloat16
    assert_rounds_as(np.asarray(out, np.float32), ref)
    assert (np.asarray(apply_rotary(q, cos, sin), np.float32) != ref).mean() > 0.1


@pytest.mark.parametrize("variant", ["olmo2/bias_mha_head_dim16_tied", "olmo3/default_layer_types_flat_rope"])
def test_greedy_generation_matches_transformers(variant, tmp_path):
    check_greedy_generation(CAUSAL_VARIANTS[variant](), tmp_path)  # the tiny_configs entries: test_generation.py


def test_olmo2_ignores_a_sliding_window_as_transformers_does(tmp_path):
    """Olmo2Model builds a full causal mask whatever the config carries; only OLMo 3 reads `sliding_window`."""
    config = TINY_CAUSAL["olmo2"]()
    config.sliding_window = 4
    pt, model = make_pair(config, tmp_path)
    assert not any(olmo2_options(model.config).sliding)
    check_forward(pt, model, "left", explicit_positions=False)


@pytest.mark.parametrize("original", [SEQ - 1, SEQ + 2])
def test_generation_with_longrope_on_one_layer_type_matches_transformers(original, tmp_path):
    """LongRoPE on OLMo 3's full layers only (`rope_parameters` per layer type): the longest prompt ending one past
    the pretraining length took the short factors in trlax's prompt pass (which read only a flat rope_type); a
    generation across it matches too (OLMo 3's transformers keeps its cache there, unlike Phi-3's)."""
    config = TINY_CAUSAL["olmo3"]()
    config.rope_parameters["full_attention"] = {
        "rope_type": "longrope", "rope_theta": 1000.0, "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [2.0, 3.0, 4.0, 5.0], "original_max_position_embeddings": original}
    check_greedy_generation(config, tmp_path, new_tokens=8)


def _olmo(model_type: str, **overrides: object):
    config = TINY_CAUSAL[model_type]()
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(("config", "error", "match"), [
    (lambda: _olmo("olmo2", use_bidirectional_attention=True), UnsupportedModelError, "bidirectional attention"),
    (lambda: _olmo("olmo2", rope_parameters={"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}),
     UnsupportedModelError, "rope_type 'proportional'"),
    (lambda: _olmo("olmo2", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.5}),
     UnsupportedModelError, "partial_rotary_factor=0.5 with rope_type 'linear'"),
    (lambda: _olmo("olmo2", hidden_act="swiglu_oai"), TrlaxError, "activation 'swiglu_oai'"),
    (lambda: _olmo("olmo3", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        "full_attention": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}}),
     UnsupportedModelError, "rope_type 'proportional'"),
    (lambda: _olmo("olmo3", layer_types=["sliding_attention", "chunked_attention"]), UnsupportedModelError,
     r"layer_types \['chunked_attention'\] are not supported"),
    (lambda: _olmo("olmo3", sliding_window=None), UnsupportedModelError, "sets no `sliding_window`"),
])
def test_unsupported_options_are_refused(config, error, match):
    with pytest.raises(error, match=match):
        FlaxAutoModelForCausalLM.from_config(config())
