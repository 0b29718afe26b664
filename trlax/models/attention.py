"""The attention core every family shares: masks, the cache write, scaled (soft-capped) softmax attention.

Families keep their own HF-named attention modules (projections, RoPE, head layout) and
hand q, k, v to `attend`; see `trlax.models.cache` for the slot semantics of the masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def split_heads_qkv(qkv: Array, num_heads: int) -> tuple[Array, Array, Array]:
    """A fused projection laid out per head as [q | k | v] (GPT-NeoX, BLOOM, Falcon's classic layout):
    [B, T, nH * 3 * D] -> q, k, v [B, T, nH, D]."""
    b, t, width = qkv.shape
    heads = qkv.reshape(b, t, num_heads, 3, width // (3 * num_heads))
    return heads[..., 0, :], heads[..., 1, :], heads[..., 2, :]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [H] float32, as transformers' Bloom and Falcon compute them.

    For H a power of two, slope_h = 2 ** (-8 (h + 1) / H); otherwise the slopes of the
    closest smaller power of two, then every other slope of the next power of two.
    Within 1 ulp of torch's float32 `pow` (its vector kernel rounds differently).
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = np.power(base, np.arange(1, 1 + closest, dtype=np.float32))
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, np.power(extra_base, np.arange(1, 1 + 2 * remaining, 2, dtype=np.float32))])
    return slopes.astype(np.float32)


def alibi_bias(key_mask: Array, slopes: Array | np.ndarray) -> Array:
    """ALiBi position bias [B, H, 1, S] in slopes' dtype, from the key mask [B, S] as transformers builds it.

    Each key's position is the number of real tokens before it in its row,
    ``(cumsum(mask) - 1) * mask``, so left padding shifts nothing; the bias is
    slope_h * position (queries do not enter: softmax is invariant to a per-row shift).
    The product is computed in slopes' dtype (Falcon rounds it to bfloat16), as PyTorch does: the positions
    and the product rounded to it. A 16-bit product is formed in float32 and rounded with `reduce_precision`,
    which XLA keeps: a bfloat16 multiply under jit stays float32 (XLA's excess precision), 1e-2 off for
    slopes that are not powers of two.
    """
    mask = key_mask.astype(jnp.int32)
    positions = ((jnp.cumsum(mask, axis=-1) - 1) * mask)[:, None, None, :]  # [B, 1, 1, S]
    slopes = jnp.asarray(slopes)[None, :, None, None]  # [1, H, 1, 1]
    if jnp.finfo(slopes.dtype).bits >= 32:
        return slopes * positions.astype(slopes.dtype)
    info = jnp.finfo(slopes.dtype)

    def rounded(x: Array) -> Array:
        return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)

    product = rounded(slopes.astype(jnp.float32) * rounded(positions.astype(jnp.float32)))
    return product.astype(slopes.dtype)


def alibi_attention_bias(key_mask: Array, q_slots: Array, slopes: np.ndarray, dtype: Any,
                         divisor: float = 1.0) -> Array:
    """The causal mask plus ALiBi, [B, H, T, S] float32, as BLOOM and Falcon add them: the ALiBi
    product in slopes' dtype, rounded to the compute `dtype`, then divided by `divisor` in it."""
    alibi = alibi_bias(key_mask, slopes).astype(dtype)  # [B, H, 1, S]
    if divisor != 1.0:
        alibi = alibi / jnp.asarray(divisor, dtype)
    return attention_bias(key_mask, q_slots) + alibi.astype(jnp.float32)


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
    zero_unseen_queries: bool = True,
) -> Array:
    """Softmax attention with grouped KV heads; scores, softmax and sums in float32.

    q: [B, T, Hq, D]; k, v: [B, Hkv, S, D] (the cache's layout) with Hq a multiple of Hkv;
    bias: [B, 1 | Hq, T, S]. Returns [B, T, Hq, Dv] in q's dtype.

    A query that sees no key (a left-pad position: every bias entry masked) outputs zeros, as
    torch's SDPA, transformers' default attention, returns there; with `zero_unseen_queries=False`
    the average of the values, as transformers' eager attention gives (Gemma 2, GPT-Neo, BLOOM).

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
        bias = bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(b, hkv, groups, *bias.shape[2:])
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1)
    if zero_unseen_queries and bias is not None:  # masked entries hold a dtype's lowest value (plus small biases)
        probs = jnp.where(bias.max(axis=-1, keepdims=True) > jnp.finfo(jnp.float32).min / 2, probs, 0.0)
    if dropout is not None and not deterministic:
        probs = dropout(probs, deterministic=False)
    # [B, Hkv, G, T, Dv], then moved to [B, T, ...]: XLA:CPU runs no bf16 x bf16 -> f32 dot that writes
    # "btkgd" directly when it is not fused into its neighbours (an eager call, or the product alone).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.moveaxis(out.astype(q.dtype), 3, 1).reshape(b, t, hq, v.shape[-1])


def attend(
    q: Array, k: Array, v: Array, bias: Array | None, cache: KVCache | None, cache_index: Array | int,
    **options: Any,
) -> tuple[Array, KVCache | None]:
    """Write k, v [B, T, Hkv, D] into the cache (if any), then attend q [B, T, Hq, D] to every key.

    With a cache the keys are its S slots; without one, the T new keys. bias: [B, 1 | Hq, T, S]
    (masks and position biases, added to the scaled, soft-capped scores). options: the keywords of
    `dot_product_attention` (scale, dropout, deterministic, softcap, zero_unseen_queries). Returns
    (out [B, T, Hq, Dv], the updated cache or None).
    """
    if cache is not None:
        cache = write_kv(cache, k, v, cache_index)
        k, v = cache["k"], cache["v"]  # [B, Hkv, S, D]
    else:
        k, v = heads_first(k), heads_first(v)
    return dot_product_attention(q, k, v, bias, **options), cache
