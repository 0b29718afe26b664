"""Falcon: trlax vs transformers (PyTorch) on the same weights, float32, atol 1e-4, for each of its layouts."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from tests.helpers import PADDINGS
from tests.parity_checks import (
    VOCAB,
    check_cached_decoding,
    check_forward,
    check_greedy_generation,
    check_save_roundtrip,
    make_pair,
)
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError


def _falcon(**overrides: object) -> transformers.FalconConfig:
    kwargs = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "ffn_hidden_size": 48, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": 1}
    return transformers.FalconConfig(**{**kwargs, **overrides})


VARIANTS = {
    # Falcon-40B style: 2 KV groups, ln_attn / ln_mlp, biased projections, untied head.
    "new_arch_gqa": TINY_CAUSAL["falcon"],
    # The new architecture with one shared norm (num_ln_in_parallel_attn=1) and a single KV group, tied head.
    "new_arch_one_ln_mqa": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1,
                                           rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 500.0}),
    # Falcon-7B: multi-query attention, parallel attention and MLP on one input_layernorm.
    "7b_multi_query_parallel": lambda: _falcon(multi_query=True, parallel_attn=True, activation="gelu"),
    # Falcon-RW: ALiBi, per-head [q|k|v], a sequential block, biases.
    "rw_alibi_sequential": lambda: _falcon(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    # ALiBi on the new architecture, 6 heads (ALiBi's extra slopes), untied head.
    "alibi_new_arch_6heads": lambda: _falcon(alibi=True, new_decoder_architecture=True, num_attention_heads=6,
                                             num_kv_heads=3, hidden_size=48, tie_word_embeddings=False),
}
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


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(pair, padding, explicit_positions):
    check_forward(*pair[1:], padding, explicit_positions)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(pair, padding):
    check_cached_decoding(pair[2], padding, explicit_positions=False)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    check_save_roundtrip(*pair[1:], tmp_path / "saved")


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
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'dynamic'"),
])
def test_unsupported_options_are_refused(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLM.from_config(_falcon(**overrides))
