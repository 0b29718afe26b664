"""Shared parity checks for the OPT, GPT-Neo and GPT-NeoX tests (no tests here).

Each check builds its inputs, compares trlax with transformers (PyTorch, float32) on the
non-pad positions, and returns the max abs logit difference it saw. Every full forward
asks for hidden states, so one compiled forward per model and position mode serves them all.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, torch_generation_init, torch_random_init
from trlax import FlaxAutoModelForCausalLM

ATOL = 1e-4
VOCAB = 101
SEQ = 11  # longer than the tiny GPT-Neo windows


def make_pair(config: transformers.PretrainedConfig, folder: Path) -> tuple[Any, Any]:
    """A random transformers model (norms and biases included), saved, and trlax's load of it."""
    torch.manual_seed(0)
    pt = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch_random_init(pt, std=0.2)
    return pt, FlaxAutoModelForCausalLM.from_pretrained(save_torch(pt, folder))


def shifted_positions(mask: np.ndarray) -> np.ndarray:
    """Explicit position_ids [B, T] that no family's default gives: 1, 2, ... on real tokens, 0 on pads."""
    return mask.cumsum(-1) * mask


def check_forward(pt: Any, model: Any, padding: str, explicit_positions: bool) -> float:
    """Logits, every hidden state and last_hidden_state match transformers; returns the logit diff."""
    ids, mask = batch(VOCAB, padding, seq_len=SEQ)
    positions = shifted_positions(mask) if explicit_positions else None
    with torch.no_grad():
        ref = pt(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                 position_ids=None if positions is None else torch.tensor(positions))
    out = model(ids, mask, position_ids=positions, output_hidden_states=True)
    assert out.logits.dtype == np.float32
    assert len(out.hidden_states) == len(ref.hidden_states) == model.spec.num_layers(model.config) + 1
    for layer, (ref_h, h) in enumerate(zip(ref.hidden_states, out.hidden_states, strict=True)):
        assert max_diff(ref_h, h, mask) < ATOL, f"hidden state {layer}"
    assert max_diff(ref.hidden_states[-1], out.last_hidden_state, mask) < ATOL
    diff = max_diff(ref.logits, out.logits, mask)
    assert diff < ATOL
    return diff


_CACHED_APPLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_apply(model: Any) -> Any:
    """One jitted cached forward per model, so every padding reuses its compilations (held while the model
    lives: a cache holding every model would keep their compiled programs for the rest of the run)."""
    if model not in _CACHED_APPLY:
        module = model.module

        @jax.jit
        def step(params, ids, key_mask, pos, cache, index):
            return module.apply({"params": params}, ids, key_mask, pos, cache=cache, cache_index=index)

        _CACHED_APPLY[model] = step
    return _CACHED_APPLY[model]


def check_cached_decoding(model: Any, padding: str, explicit_positions: bool) -> float:
    """Prefill T-3 tokens into a cache of S > T slots, feed the rest one at a time: same logits as one pass.

    The key mask covers all S slots (the trailing unused ones 0), as generation passes it;
    with position_ids=None each family derives its default positions from it and cache_index.
    """
    ids, mask = batch(VOCAB, padding, seq_len=SEQ)
    positions = shifted_positions(mask) if explicit_positions else None
    full = np.asarray(model(ids, mask, position_ids=positions, output_hidden_states=True).logits)

    b, t = ids.shape
    slots = t + 3
    key_mask = np.zeros((b, slots), np.int32)
    key_mask[:, :t] = mask
    cache = model.spec.init_cache(model.config, b, slots, model.dtype)
    step = _cached_apply(model)
    pieces = []
    bounds = [(0, t - 3)] + [(i, i + 1) for i in range(t - 3, t)]
    for start, stop in bounds:
        out = step(model.params, ids[:, start:stop], key_mask,
                   None if positions is None else positions[:, start:stop], cache, start)
        pieces.append(np.asarray(out.logits))
        cache = out.cache
    assert len(cache) == model.spec.num_layers(model.config)
    geometry = model.spec.cache_geometry(model.config)
    assert cache[0]["k"].shape == (b, geometry.num_kv_heads, slots, geometry.head_dim)
    diff = max_diff(full, np.concatenate(pieces, axis=1), mask)
    assert diff < ATOL
    return diff


def check_past_key_values(pt: Any, model: Any, padding: str, past: int = 7) -> float:
    """A forward over the first `past` tokens with use_cache=True, then one over the rest with its cache
    (attention_mask covering both): logits as transformers' two calls, and the cache holds every token."""
    ids, mask = batch(VOCAB, padding, seq_len=SEQ)
    with torch.no_grad():
        first = pt(torch.tensor(ids[:, :past]), attention_mask=torch.tensor(mask[:, :past]), use_cache=True)
        ref = pt(torch.tensor(ids[:, past:]), attention_mask=torch.tensor(mask), cache=first.cache, use_cache=True)
    cache = model(ids[:, :past], mask[:, :past], use_cache=True).cache
    out = model(ids[:, past:], mask, cache=cache)
    geometry = model.spec.cache_geometry(model.config)
    assert len(out.cache) == geometry.num_layers
    assert out.cache[0]["k"].shape == (ids.shape[0], geometry.num_kv_heads, SEQ, geometry.head_dim)
    diff = max_diff(ref.logits, out.logits, mask[:, past:])
    assert diff < ATOL
    return diff


def check_save_roundtrip(pt: Any, model: Any, folder: Path) -> float:
    """trlax save_pretrained -> transformers from_pretrained: the same tensors and logits."""
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
    diff = max_diff(logits, model(ids, mask, output_hidden_states=True).logits, mask)
    assert diff < ATOL
    return diff




def check_greedy_generation(config: transformers.PretrainedConfig, folder: Path, new_tokens: int = 8) -> None:
    """trlax's greedy `generate` equals transformers' token for token on left-padded prompts,
    first with an eos no row emits, then with an eos row 0 emits (rows pad after their eos).
    The weights keep activations O(1), so the greedy tokens vary (`torch_generation_init`)."""
    pt = torch_generation_init(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    model = FlaxAutoModelForCausalLM.from_pretrained(save_torch(pt, folder))
    ids, mask = batch(VOCAB, "left", seq_len=SEQ, low=2)
    pad = model.config.pad_token_id

    def both(eos: int) -> np.ndarray:
        out = np.asarray(model.generate(ids, mask, max_new_tokens=new_tokens, pad_token_id=pad,
                                        eos_token_id=eos).sequences)
        gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad,
                                                   eos_token_id=eos)
        with torch.no_grad():
            ref = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gen_config)
        expected = np.full(out.shape, pad)
        expected[:, : ref.shape[1]] = ref.numpy()  # transformers stops once every row has finished
        np.testing.assert_array_equal(out, expected)
        return out

    out = both(VOCAB)  # an eos no row can emit: every new token is compared
    assert len(np.unique(out[:, SEQ:])) > 2, "degenerate greedy output: the check would be weak"
    both(int(out[0, SEQ + 2]))
