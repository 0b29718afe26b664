"""The KV cache: its geometry, its layout, and the one place it is written.

Attention works on *cache slots*. Without a cache the T query tokens sit in slots 0..T-1
and attend to the same T keys; with a cache of S slots they sit in slots
``cache_index .. cache_index + T - 1`` and attend to all S slots. One boolean key mask
[B, S] (1 = real token) and the causal rule "key slot <= query slot" then cover both
cases, left padding included, with no per-row offsets; slots not yet written lie in the
future of every query, so they need no masking of their own.

Layout: one {"k", "v"} pair of [B, S, Hkv, D] per layer, in the compute dtype. Inside a
jitted `lax.while_loop` the cache is part of the loop carry and `write_kv` updates it with
`dynamic_update_slice`, which XLA performs in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
KVCache = dict[str, Array]  # {"k": [B, S, Hkv, D], "v": [B, S, Hkv, D]}


@dataclass(frozen=True)
class CacheGeometry:
    """The shape of a decoder's KV cache: num_layers x {"k", "v"} [B, S, num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def empty_kv_cache(batch: int, max_len: int, geometry: CacheGeometry, dtype: Any) -> list[KVCache]:
    """A zeroed cache for `batch` rows of `max_len` slots, one {"k", "v"} per layer."""
    shape = (batch, max_len, geometry.num_kv_heads, geometry.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(geometry.num_layers)]


def query_slots(seq_len: int, cache_index: Array | int) -> Array:
    """Cache slots of the current query tokens: [T] int32."""
    return jnp.arange(seq_len, dtype=jnp.int32) + jnp.asarray(cache_index, jnp.int32)


def write_kv(cache: KVCache, k: Array, v: Array, cache_index: Array | int) -> KVCache:
    """The cache with k, v [B, T, Hkv, D] written at slots cache_index.. (the same for every row)."""
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, idx, zero, zero)),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, idx, zero, zero)),
    }
