"""The attention core every family shares: masks, the cache write, scaled (soft-capped) softmax attention.

Families keep their own HF-named attention modules (projections, RoPE, head layout) and
hand q, k, v to `attend`; see `trlax.models.cache` for the slot semantics of the masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.models.cache import KVCache, heads_first, write_kv

Array = jax.Array
Masks = dict[int | None, Array]  # sliding window (None = full attention) -> additive bias [B, 1, T, S]


def attention_bias(
    key_mask: Array,
    q_slots: Array,
    dtype: Any = jnp.float32,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
) -> Array:
    """Additive attention bias [B, 1, T, S] from a key mask [B, S] and query slots [T].

    A key is visible when it is a real token (mask 1), not in the future (causal) and,
    with a sliding window W, fewer than W slots behind the query (HF's rule:
    ``q - k < W``). Hidden keys get dtype's most negative finite value, not -inf, so a
    fully hidden row (a left-pad query) gives a finite, ignorable result instead of NaN.
    """
    k_slots = jnp.arange(key_mask.shape[-1], dtype=jnp.int32)
    visible = key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]
    rel = q_slots[:, None] - k_slots[None, :]  # [T, S]
    if causal:
        visible = visible & (rel >= 0)[None, None]
    if sliding_window is not None:
        visible = visible & (rel < sliding_window)[None, None]
    return jnp.where(visible, 0.0, jnp.finfo(dtype).min).astype(dtype)


def causal_masks(key_mask: Array, q_slots: Array, windows: Iterable[int | None]) -> Masks:
    """One causal bias per distinct sliding window the layers use (None = full attention).

    Windows count cache slots, not positions, as transformers' masks do: left-pad slots
    count toward a window exactly as they do there.
    """
    return {window: attention_bias(key_mask, q_slots, sliding_window=window) for window in set(windows)}


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    *,
    scale: float,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
    softcap: float | None = None,
) -> Array:
    """Softmax attention with grouped KV heads; scores, softmax and sums in float32.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D] (the cache's layout) with Hq a multiple of Hkv;
    bias: [B, 1 | Hq, T, S]. Returns [B, T, Hq, Dv] in q's dtype.

    One path for every T (prompt pass, decode step, training): two products batched over
    (B, Hkv), which read k and v where they lie. Both products accumulate in float32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:  # [B, 1 | Hq, T, S] -> [B, 1 | Hkv, 1 | G, T, S]
        bias = bias.astype(jnp.float32)
        scores = scores + (bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(b, hkv, groups, *bias.shape[2:]))
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None and not deterministic:
        probs = dropout(probs, deterministic=False)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, hq, v.shape[-1])


def attend(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    cache: KVCache | None,
    cache_index: Array | int,
    *,
    scale: float,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
    softcap: float | None = None,
) -> tuple[Array, KVCache | None]:
    """Write k, v [B, T, Hkv, D] into the cache (if any), then attend q [B, T, Hq, D] to every key.

    With a cache the keys are its S slots; without one, the T new keys. bias: [B, 1 | Hq, T, S]
    (masks and position biases, added to the scaled, soft-capped scores). Returns
    (out [B, T, Hq, Dv], the updated cache or None).
    """
    if cache is not None:
        cache = write_kv(cache, k, v, cache_index)
        k, v = cache["k"], cache["v"]  # [B, Hkv, S, D]
    else:
        k, v = heads_first(k), heads_first(v)
    out = dot_product_attention(q, k, v, bias, scale=scale, dropout=dropout, deterministic=deterministic,
                                softcap=softcap)
    return out, cache
