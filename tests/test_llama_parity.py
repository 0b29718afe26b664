"""Llama family (llama, mistral, qwen2, qwen3): what the generic parity checks in
tests/test_causal_parity.py do not cover (RoPE frequencies, refusals, sliding windows, buffers).
`check_window_matters` here is shared with tests/test_gemma_parity.py.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.parity_checks import ATOL, SEQ, VOCAB, check_forward, check_greedy_generation, make_pair
from tests.tiny_configs import CAUSAL_VARIANTS, ROPE_VARIANTS, TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.rope import inv_frequencies


def llama_with_rope(name: str) -> transformers.LlamaConfig:
    return CAUSAL_VARIANTS[f"llama/rope_{name}"]()


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_inv_frequencies_equal_transformers_within_two_ulps(name):
    """float32 `base ** x` is correctly rounded in neither numpy nor torch: each pow kernel is within
    1 ulp of the exact value (and AVX2 vs AVX-512 paths differ), so two implementations may disagree by
    2 ulps. The bound is 2 ulps, not bit equality (seen: 0 on AVX2 machines, 1-2 on AVX-512 ones)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_with_rope(name)
    ref = LlamaRotaryEmbedding(config).inv_freq.numpy()
    np.testing.assert_array_max_ulp(inv_frequencies(config, config.head_dim), ref, maxulp=2)


@pytest.mark.parametrize("theta", [10_000.0, 500_000.0, 1_000_000.0])
@pytest.mark.parametrize("dim", [64, 128])
def test_inv_frequencies_are_within_one_ulp_of_the_exact_value(theta, dim):
    """torch's float32 pow is within its last bit; numpy's float32 pow, which trlax used, is 1-2 ulps off, and the
    error grows with the position in every rotation angle (Gemma 3 logits 4e-4 off at 1500 tokens). The power
    rounded from float64 plus a float32 reciprocal is within 1 ulp of the exact value on any CPU."""
    from trlax.models.rope import base_inv_frequencies

    exponent = (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)).astype(np.float64)
    exact = (1.0 / np.float64(theta) ** exponent).astype(np.float32)
    np.testing.assert_array_max_ulp(base_inv_frequencies(theta, dim), exact, maxulp=1)


def test_llama3_variant_exercises_all_three_bands():
    config = llama_with_rope("llama3")
    base = 1.0 / (100.0 ** (np.arange(0, 8, 2) / 8))
    ratio = inv_frequencies(config, 8) / base
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 1 / 8)  # kept, divided
    assert 1 / 8 < ratio[1] < 1.0  # interpolated


def test_yarn_variant_exercises_all_three_bands():
    config = llama_with_rope("yarn")
    ratio = inv_frequencies(config, 8) / (1.0 / (100.0 ** (np.arange(0, 8, 2) / 8)))
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 1 / 4)  # kept, divided
    assert 1 / 4 < ratio[1] < ratio[0] and 1 / 4 < ratio[2] < ratio[1]  # the ramp between


@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.5}, {"mscale": 0.7, "mscale_all_dim": 1.3},
                                   {"factor": None, "original_max_position_embeddings": 16}])
def test_yarn_attention_scaling_equals_transformers(extra):
    """YaRN multiplies cos and sin by an attention factor: the config's, else inferred from `factor` (or from
    max_position_embeddings / original_max_position_embeddings without one), with DeepSeek's mscale ratio."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from trlax.models.rope import attention_scaling

    config = llama_with_rope("yarn")
    config.rope_parameters.update(extra)
    expected = LlamaRotaryEmbedding(config)
    assert attention_scaling(config) == pytest.approx(expected.attention_scaling, rel=1e-12)
    assert attention_scaling(config) != 1.0
    np.testing.assert_array_max_ulp(inv_frequencies(config, config.head_dim), expected.inv_freq.numpy(), maxulp=2)
    assert attention_scaling(llama_with_rope("llama3")) == 1.0


def test_legacy_rope_attributes_are_read():
    class Legacy:  # an old-style config object: rope_theta + rope_scaling, no rope_parameters
        rope_theta = 500.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    np.testing.assert_allclose(inv_frequencies(Legacy(), 8), 1.0 / (500.0 ** (np.arange(0, 8, 2) / 8)) / 2.0,
                               rtol=1e-6)


def test_unsupported_rope_type_is_refused_on_load(tmp_path):
    config = TINY_CAUSAL["llama"]()
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}
    save_torch(transformers.AutoModelForCausalLM.from_config(config), tmp_path)
    with pytest.raises(UnsupportedModelError,
                       match=r"rope_type 'proportional'.*'default', 'linear', 'dynamic', 'llama3'"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_partial_rotary_with_scaled_rope_is_refused():
    config = llama_with_rope("linear")
    config.rope_parameters["partial_rotary_factor"] = 0.5
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_unknown_layer_type_is_refused():
    config = TINY_CAUSAL["qwen2"]()
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        FlaxAutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", ["llama", "granite"])
def test_a_stray_sliding_window_is_ignored_where_transformers_ignores_it(name, tmp_path):
    """transformers' Llama and Granite read no `sliding_window` (OLMo 2: tests/test_olmo2_parity.py); trlax applied
    Mistral's rule to a config that held one (a stray config.json key): logits 4.8 off for Llama, 0.05 for Granite."""
    config = TINY_CAUSAL[name]()
    config.sliding_window = 4
    check_forward(*make_pair(config, tmp_path), "left", explicit_positions=False)


@pytest.mark.parametrize("original", [8, SEQ - 1, SEQ + 2])
def test_longrope_generation_on_both_sides_of_the_pretraining_length_matches_transformers(original, tmp_path):
    """LongRoPE on Llama: each call picks the short or long factors from its largest position; transformers' Llama
    keeps its KV cache when a generation crosses the pretraining length (Phi-3 rebuilds it: test_phi3_parity)."""
    config = TINY_CAUSAL["llama"]()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.6, 2.0],
                              "long_factor": [2.0, 3.0, 5.0, 8.0], "original_max_position_embeddings": original}
    check_greedy_generation(config, tmp_path, new_tokens=8)


def dynamic_ntk_llama(max_positions: int) -> transformers.LlamaConfig:
    config = TINY_CAUSAL["llama"]()
    config.max_position_embeddings = max_positions
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    return config


def test_dynamic_ntk_rope_matches_transformers_past_and_within_the_pretraining_length(tmp_path):
    """Dynamic NTK RoPE (refused before): a call longer than max_position_embeddings (SEQ = 11 > 8) rotates with
    the frequencies of its own length, as transformers' first call does; a shorter call after it with the
    pretraining ones again (transformers resets there)."""
    pt, model = make_pair(dynamic_ntk_llama(8), tmp_path)
    check_forward(pt, model, "left", explicit_positions=False)
    ids, mask = batch(VOCAB, "left", seq_len=SEQ)
    plain = dynamic_ntk_llama(8)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    # the length's frequencies matter: the pretraining ones give other logits
    assert max_diff(type(model)(plain, params=model.params)(ids, mask).logits, model(ids, mask).logits, mask) > 1e-3
    short, short_mask = ids[:, -6:], mask[:, -6:]
    with torch.no_grad():
        want = pt(torch.tensor(short), attention_mask=torch.tensor(short_mask)).logits
    assert max_diff(want, model(short, short_mask).logits, short_mask) < ATOL


@pytest.mark.parametrize("factor", [None, "2", 0.0])
def test_dynamic_ntk_without_a_positive_factor_is_refused(factor):
    """transformers' dynamic NTK reads `factor` at every call past the pretraining length (a KeyError without one)."""
    config = dynamic_ntk_llama(8)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0,
                              **({} if factor is None else {"factor": factor})}
    with pytest.raises(UnsupportedModelError, match=f"needs a positive number `factor`.*got {factor!r}"):
        FlaxAutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("max_positions", [SEQ + 1, SEQ + 2])
def test_dynamic_ntk_generation_across_the_pretraining_length_matches_transformers(max_positions, tmp_path):
    """Each decode step past max_position_embeddings rotates its token with the frequencies of its length, as
    transformers' step does (the prompts, within it, start each generation at the pretraining ones)."""
    check_greedy_generation(dynamic_ntk_llama(max_positions), tmp_path, new_tokens=8)


@pytest.mark.parametrize("name", ["granite", "smollm3"])
@pytest.mark.parametrize(("overrides", "match"), [
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type 'proportional'"),
    ({"hidden_act": "swish_x"}, "activation 'swish_x' is not supported"),
    ({"use_bidirectional_attention": True}, "bidirectional attention"),
])
def test_what_granite_and_smollm3_cannot_run_is_refused_at_load(name, overrides, match):
    config = TINY_CAUSAL[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModelError, match=match):
        FlaxAutoModelForCausalLM.from_config(config)


def test_sliding_layer_without_window_is_refused():
    config = TINY_CAUSAL["qwen3"]()
    config.layer_types = ["full_attention", "sliding_attention"]
    assert config.sliding_window is None  # use_sliding_window=False clears it
    with pytest.raises(UnsupportedModelError, match="sets no `sliding_window`"):
        FlaxAutoModelForCausalLM.from_config(config)


def test_fewer_layer_types_than_layers_is_refused_naming_both():
    """A config grown after construction (num_hidden_layers raised, layer_types left) failed with a bare
    IndexError when the model was built; transformers validates the two lengths when a config is made."""
    config = TINY_CAUSAL["qwen3"]()
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.num_hidden_layers += 1
    with pytest.raises(UnsupportedModelError, match=f"qwen3 config has {config.num_hidden_layers - 1} layer_types "
                       f"for num_hidden_layers={config.num_hidden_layers}"):
        FlaxAutoModelForCausalLM.from_config(config)


def check_window_matters(pt: Any) -> None:
    """The tiny config's sliding window changes transformers' own output on SEQ tokens, so parity
    with it proves the window is implemented (and not just never reached)."""
    config = pt.config.__class__.from_dict(pt.config.to_dict())
    config.sliding_window = 10 * SEQ  # a window no sequence here reaches
    unwindowed = type(pt)(config).eval()
    unwindowed.load_state_dict(pt.state_dict())
    ids = torch.tensor(batch(VOCAB, "none", seq_len=SEQ)[0])
    with torch.no_grad():
        assert max_diff(pt(ids).logits, unwindowed(ids).logits) > 1e-3


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi3", "starcoder2", "olmo3"])
def test_sliding_window_is_exercised(name):
    torch.manual_seed(0)
    check_window_matters(torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL[name]())))


def test_rotary_buffers_in_a_checkpoint_are_ignored(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, model = make_pair(TINY_CAUSAL["llama"](), tmp_path / "torch")
    folder = tmp_path / "with_buffers"
    model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    inv_freq = inv_frequencies(model.config, model.config.head_dim)
    tensors["model.rotary_emb.inv_freq"] = inv_freq  # transformers 4.4x
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq  # older Llama checkpoints
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    again = FlaxAutoModelForCausalLM.from_pretrained(folder)
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    assert len(leaves) == len(jax.tree_util.tree_leaves(again.params))
    for path, leaf in leaves:
        np.testing.assert_array_equal(leaf, _get(again.params, path))


def _get(tree: Any, path: Any) -> Any:
    for key in path:
        tree = tree[key.key]
    return tree
