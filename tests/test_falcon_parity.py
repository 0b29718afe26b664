"""Falcon: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4, for each of its layouts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity_checks import (
    check_cached_decoding,
    check_forward,
    check_greedy_generation,
    make_pair,
)
from tests.tiny_configs import CAUSAL_VARIANTS, TINY_CAUSAL, falcon_with
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError

VARIANTS = {"new_arch_gqa": TINY_CAUSAL["falcon"]} | {  # parity of each: tests/test_causal_parity.py
    name.removeprefix("falcon/"): make for name, make in CAUSAL_VARIANTS.items() if name.startswith("falcon/")}
# layout -> the layer norms its blocks have, and the KV heads of its cache
LAYOUT = {
    "new_arch_gqa": ({"ln_attn", "ln_mlp"}, 2),
    "new_arch_one_ln_mqa": ({"input_layernorm"}, 1),
    "7b_multi_query_parallel": ({"input_layernorm"}, 1),
    "rw_alibi_sequential": ({"input_layernorm", "post_attention_layernorm"}, 4),
    "alibi_new_arch_6heads": ({"ln_attn", "ln_mlp"}, 3),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    return request.param, *make_pair(VARIANTS[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(variant, tmp_path):
    check_greedy_generation(VARIANTS[variant](), tmp_path)


def test_layout_is_the_one_transformers_builds(pair):
    """The variants really differ: each block's norms and the cache's KV heads are those of the layout."""
    name, pt, model = pair
    norms, kv_heads = LAYOUT[name]
    block = model.params["transformer"]["h"]["0"]
    assert {k for k in block if "norm" in k or k.startswith("ln_")} == norms
    assert {k.split(".")[3] for k in pt.state_dict() if ".h.0." in k and "norm" in k or ".h.0.ln_" in k} == norms
    assert model.spec.cache_geometry(model.config).num_kv_heads == kv_heads
    qkv = pt.state_dict()["transformer.h.0.self_attention.query_key_value.weight"]
    np.testing.assert_array_equal(np.asarray(block["self_attention"]["query_key_value"]["kernel"]), qkv.numpy().T)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"new_decoder_architecture": True, "parallel_attn": False}, "new_decoder_architecture=True with parallel_attn"),
    ({"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2 needs new_decoder_architecture"),
    ({"multi_query": False, "num_kv_heads": 2}, r"num_kv_heads=2 != num_attention_heads=4"),
    ({"new_decoder_architecture": True, "num_kv_heads": 3}, "not a multiple of num_kv_heads=3"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'proportional'"),
])
def test_unsupported_options_are_refused(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLM.from_config(falcon_with(**overrides))


def test_alibi_slopes_that_bfloat16_rounds_match_transformers(tmp_path):
    """10 heads: slopes that are not powers of two, whose bfloat16 product with the positions transformers rounds
    to bfloat16. Under jit XLA kept the product in float32 (its excess precision): logits 1e-3 to 4e-3 off."""
    pt, model = make_pair(falcon_with(alibi=True, num_attention_heads=10, hidden_size=40), tmp_path)
    check_forward(pt, model, "left", explicit_positions=False)
    check_cached_decoding(model, "left", explicit_positions=False)
