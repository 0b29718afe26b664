"""The KV cache: its geometry, its layout, and the one place it is written.

Attention works on *cache slots*. Without a cache the T query tokens sit in slots 0..T-1
and attend to the same T keys; with a cache of S slots they sit in slots
``cache_index .. cache_index + T - 1`` and attend to all S slots. One boolean key mask
[B, S] (1 = real token) and the causal rule "key slot <= query slot" then cover both
cases, left padding included, with no per-row offsets; slots not yet written lie in the
future of every query, so they need no masking of their own.

Layout: a list with one {"k", "v"} pair of [B, Hkv, S, D] per layer (not one stacked
array), in the compute dtype. Heads before slots is the layout the attention products read
as they are, batched over (B, Hkv) with each head's [S, D] block contiguous: a
[B, S, Hkv, D] cache makes XLA:CPU transpose (copy) every layer's whole cache on every
decode step. Inside a jitted `lax.while_loop` the cache is part of the loop carry and
`write_kv` updates it with `dynamic_update_slice`, which XLA performs in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trlax.errors import InputError

Array = jax.Array
KVCache = dict[str, Array]  # {"k": [B, Hkv, S, D], "v": [B, Hkv, S, D]}


@dataclass(frozen=True)
class CacheGeometry:
    """The shape of a decoder's KV cache: num_layers x {"k", "v"} [B, num_kv_heads, S, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def empty_kv_cache(batch: int, max_len: int, geometry: CacheGeometry, dtype: Any) -> list[KVCache]:
    """A zeroed cache for `batch` rows of `max_len` slots, one {"k", "v"} per layer."""
    shape = (batch, geometry.num_kv_heads, max_len, geometry.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(geometry.num_layers)]


def query_slots(seq_len: int, cache_index: Array | int) -> Array:
    """Cache slots of the current query tokens: [T] int32."""
    return jnp.arange(seq_len, dtype=jnp.int32) + jnp.asarray(cache_index, jnp.int32)


def heads_first(x: Array) -> Array:
    """[B, T, H, D] (the projections' layout) -> [B, H, T, D] (the cache's)."""
    return x.transpose(0, 2, 1, 3)


def write_kv(cache: KVCache, k: Array, v: Array, cache_index: Array | int) -> KVCache:
    """The cache with k, v [B, T, Hkv, D] written at slots cache_index.. (the same for every row).

    Only the T new slots are transposed; the write is one `dynamic_update_slice` per array.
    """
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, idx, zero)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], heads_first(k).astype(cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], heads_first(v).astype(cache["v"].dtype), start),
    }


def past_kv_cache(past_key_values: Any, geometry: CacheGeometry, batch: int) -> list[KVCache]:
    """A forward's `past_key_values` as the cache it continues (one {"k", "v"} [B, Hkv, P, D] per layer),
    checked by `past_kv_length`."""
    past_kv_length(past_key_values, geometry, batch)
    return [{"k": jnp.asarray(k), "v": jnp.asarray(v)} for k, v in kv_pairs(past_key_values)]


def kv_pairs(past_key_values: Any) -> list[tuple[Any, ...]] | None:
    """The (k, v) of each layer of a `past_key_values` ({"k", "v"} dicts or pairs), as given; None if it holds
    neither."""
    try:
        return [(layer["k"], layer["v"]) if isinstance(layer, Mapping) else tuple(layer) for layer in past_key_values]
    except (TypeError, KeyError):
        return None


def past_kv_length(past_key_values: Any, geometry: CacheGeometry, batch: int) -> int:
    """P, the tokens a forward's `past_key_values` holds, from its shapes alone (nothing is copied).

    Accepted: what a forward with `use_cache=True` returns (one {"k", "v"} [B, Hkv, P, D] per
    layer) or transformers' legacy layout of such JAX or numpy arrays (one (k, v) pair per layer); P,
    the tokens seen so far, is the same in every layer. Anything else raises InputError: transformers'
    Cache objects, torch tensors (convert with `.numpy()`; transformers' caches of sliding-window layers
    keep only the window's last tokens, which is not such a cache).
    """
    layers = kv_pairs(past_key_values)
    if layers is None or any(len(layer) != 2 for layer in layers):
        raise InputError("past_key_values must be the cache a forward with use_cache=True returned: one "
                         '{"k", "v"} (or (k, v)) per layer')
    if len(layers) != geometry.num_layers:
        raise InputError(f"past_key_values holds {len(layers)} layers; this model has {geometry.num_layers}")
    if not all(isinstance(array, jax.Array | np.ndarray) for pair in layers for array in pair):
        raise InputError("past_key_values must hold JAX or numpy arrays (a forward's cache, or transformers' legacy "
                         "layout of them); convert torch tensors with .numpy(), transformers' Cache objects are "
                         "not read")
    if any(np.ndim(array) != 4 for pair in layers for array in pair):
        raise InputError("past_key_values must hold 4-D keys and values [B, num_kv_heads, past tokens, head_dim] "
                         "in every layer, as a forward with use_cache=True returns them")
    past = np.shape(layers[0][0])[2]
    expected = (batch, geometry.num_kv_heads, past, geometry.head_dim)
    for i, pair in enumerate(layers):
        for name, array in zip("kv", pair, strict=True):
            if tuple(np.shape(array)) != expected:
                raise InputError(f"past_key_values layer {i} {name} has the shape {tuple(np.shape(array))}; this "
                                 f"model and batch need [B, num_kv_heads, past tokens, head_dim] = {expected}")
    return past


def extended_cache(cache: list[KVCache], new_slots: int, dtype: Any) -> list[KVCache]:
    """The cache in `dtype` with `new_slots` zeroed slots appended to each layer's [B, Hkv, P, D] arrays."""
    pad = ((0, 0), (0, 0), (0, new_slots), (0, 0))
    return [{name: jnp.pad(array.astype(dtype), pad) for name, array in layer.items()} for layer in cache]
