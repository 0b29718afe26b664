"""Llama family (llama, mistral, qwen2, qwen3): trlax vs transformers (PyTorch), float32, atol 1e-4.

The check functions here (no `test_` prefix) are shared with tests/test_gemma_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import PADDINGS, batch, max_diff, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM
from trlax.errors import UnsupportedModelError
from trlax.models.llama import head_dim_of
from trlax.models.rope import inv_frequencies

ATOL = 1e-4
VOCAB = 101
SEQ = 11  # > 2 x the tiny sliding windows (4)

# Rope scaling variants of the tiny llama. llama3's numbers put one frequency in each of its
# three bands (kept, interpolated, divided by `factor`) for head_dim 8.
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 100.0},
}


def llama_with_rope(name: str) -> transformers.LlamaConfig:
    config = TINY_CAUSAL["llama"]()
    config.rope_parameters = dict(ROPE_VARIANTS[name])
    return config


DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# --- shared checks -----------------------------------------------------------------------


def make_pair(config: transformers.PretrainedConfig, folder: Path) -> tuple[Any, Any]:
    """A random transformers model (norms included), saved, and the trlax model loaded from it."""
    torch.manual_seed(0)
    pt = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch_random_init(pt, std=0.2)
    return pt, FlaxAutoModelForCausalLM.from_pretrained(save_torch(pt, folder))


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Padding-independent positions: cumsum(mask) - 1, clipped at 0 for left pads."""
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def check_forward(pt: Any, model: Any, padding: str, explicit_positions: bool) -> float:
    """Logits and every hidden state match transformers on non-pad positions; returns the logit diff."""
    ids, mask = batch(VOCAB, padding, seq_len=SEQ)
    positions = mask_positions(mask) if explicit_positions else None
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                 position_ids=None if positions is None else torch.tensor(positions))
    out = model(ids, mask, position_ids=positions, output_hidden_states=True)
    assert out.logits.dtype == np.float32
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for layer, (ref_h, h) in enumerate(zip(ref.hidden_states, out.hidden_states, strict=True)):
        assert max_diff(ref_h, h, mask) < ATOL, f"hidden state {layer}"
    assert max_diff(ref.hidden_states[-1], out.last_hidden_state, mask) < ATOL
    diff = max_diff(ref.logits, out.logits, mask)
    assert diff < ATOL
    return diff


_STEP_FNS: dict[int, Any] = {}


def _cached_step(model: Any) -> Any:
    """One jitted `module.apply` with a cache per model, so every padding reuses its compilation."""
    if id(model) not in _STEP_FNS:
        _STEP_FNS[id(model)] = jax.jit(lambda params, ids, key_mask, pos, cache, index: model.module.apply(
            {"params": params}, ids, key_mask, pos, cache=cache, cache_index=index))
    return _STEP_FNS[id(model)]


def check_cached_decoding(model: Any, padding: str, explicit_positions: bool) -> None:
    """Prefill T-2 tokens into a cache of S > T slots, feed the rest one by one: same logits as one pass."""
    ids, mask = batch(VOCAB, padding, seq_len=SEQ)
    positions = mask_positions(mask) if explicit_positions else None
    full = model(ids, mask, position_ids=positions, output_hidden_states=True).logits  # [B, T, V]

    b, t = ids.shape
    slots = t + 3  # unused trailing slots stay masked out
    key_mask = np.zeros((b, slots), np.int32)
    key_mask[:, :t] = mask
    cache = model.spec.init_cache(model.config, b, slots, model.dtype)
    step = _cached_step(model)

    pieces = []
    for start, stop in [(0, t - 2), *((i, i + 1) for i in range(t - 2, t))]:
        pos = None if positions is None else positions[:, start:stop]
        out = step(model.params, ids[:, start:stop], key_mask, pos, cache, start)
        pieces.append(np.asarray(out.logits))
        cache = out.cache
    assert cache[0]["k"].shape == (b, slots, model.config.num_key_value_heads, head_dim_of(model.config))
    assert max_diff(full, np.concatenate(pieces, axis=1), mask) < ATOL


def check_save_roundtrip(pt: Any, model: Any, folder: Path) -> None:
    """trlax save_pretrained -> transformers from_pretrained: same tensors, same logits."""
    model.save_pretrained(folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(back) is type(pt)
    ref_sd, back_sd = pt.state_dict(), back.state_dict()
    assert set(back_sd) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(back_sd[key], value), key
    ids, mask = batch(VOCAB, "left", seq_len=SEQ)
    with torch.no_grad():
        logits = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert max_diff(logits, model(ids, mask, output_hidden_states=True).logits, mask) < ATOL


# --- llama, mistral, qwen2, qwen3 --------------------------------------------------------


@pytest.fixture(scope="module", params=DECODER_TYPES)
def pair(request, tmp_path_factory):
    return make_pair(TINY_CAUSAL[request.param](), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=list(ROPE_VARIANTS))
def rope_pair(request, tmp_path_factory):
    return make_pair(llama_with_rope(request.param), tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_logits_and_hidden_states_match_pytorch(pair, padding, explicit_positions):
    check_forward(*pair, padding, explicit_positions)


@pytest.mark.parametrize("padding", PADDINGS)
def test_scaled_rope_matches_pytorch(rope_pair, padding):
    # Mask-derived positions only: scaling acts on the inverse frequencies, and the default-position
    # path is the plain llama's, tested above (one compilation per variant keeps this file fast).
    check_forward(*rope_pair, padding, explicit_positions=True)


@pytest.mark.parametrize("padding", PADDINGS)
def test_cached_decoding_matches_full_forward(pair, padding):
    check_cached_decoding(pair[1], padding, explicit_positions=False)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_cached_decoding_with_mask_positions(pair):
    check_cached_decoding(pair[1], "left", explicit_positions=True)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    check_save_roundtrip(*pair, tmp_path / "saved")


def test_tied_checkpoint_has_no_lm_head(pair):
    _, model = pair
    tied = model.config.tie_word_embeddings
    assert ("lm_head" in model.params) is not tied
    assert ("lm_head.weight" in model.state_dict()) is not tied


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_inv_frequencies_equal_transformers_bit_for_bit(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_with_rope(name)
    ref = LlamaRotaryEmbedding(config).inv_freq.numpy()
    np.testing.assert_array_equal(inv_frequencies(config, config.head_dim), ref)


def test_llama3_variant_exercises_all_three_bands():
    config = llama_with_rope("llama3")
    base = 1.0 / (100.0 ** (np.arange(0, 8, 2) / 8))
    ratio = inv_frequencies(config, 8) / base
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 1 / 8)  # kept, divided
    assert 1 / 8 < ratio[1] < 1.0  # interpolated


def test_legacy_rope_attributes_are_read():
    class Legacy:  # an old-style config object: rope_theta + rope_scaling, no rope_parameters
        rope_theta = 500.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    np.testing.assert_allclose(inv_frequencies(Legacy(), 8), 1.0 / (500.0 ** (np.arange(0, 8, 2) / 8)) / 2.0,
                               rtol=1e-6)


def test_unsupported_rope_type_is_refused_on_load(tmp_path):
    config = TINY_CAUSAL["llama"]()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    save_torch(transformers.AutoModelForCausalLM.from_config(config), tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"rope_type 'dynamic'.*'default', 'linear', 'llama3'"):
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


def test_sliding_layer_without_window_is_refused():
    config = TINY_CAUSAL["qwen3"]()
    config.layer_types = ["full_attention", "sliding_attention"]
    assert config.sliding_window is None  # use_sliding_window=False clears it
    with pytest.raises(UnsupportedModelError, match="sets no `sliding_window`"):
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


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
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
