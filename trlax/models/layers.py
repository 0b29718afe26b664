"""Building blocks shared by every trlax model family.

Attention here works on *cache slots*: without a KV cache the T query tokens sit in slots
0..T-1 and attend to the same T keys; with a cache of S slots they sit in slots
``cache_index .. cache_index + T - 1`` and attend to all S slots. One boolean key mask
``[B, S]`` (1 = real token) and the causal rule "key slot <= query slot" then cover both
cases, left padding included, with no per-row offsets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
KVCache = dict[str, Array]  # {"k": [B, S, Hkv, D], "v": [B, S, Hkv, D]}


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> JAX functions.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python": _gelu_exact,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The JAX function for a transformers activation name; raises for unknown names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported by trlax; supported: {sorted(ACTIVATIONS)}"
        ) from None


class LayerStack(nn.Module):
    """A list of blocks whose params are named "0", "1", ... like a torch ModuleList.

    `make_block(layer_idx=i, name=str(i))` builds block i, so param paths read
    `transformer.h.0.attn...` exactly as the PyTorch state dict does.
    """

    make_block: Callable[..., nn.Module]
    num_layers: int

    def setup(self) -> None:
        self.blocks = [self.make_block(layer_idx=i, name=str(i)) for i in range(self.num_layers)]


def torch_linear_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and bias)."""
    bound = 1.0 / (fan_in**0.5)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal_init(std: float) -> Callable[..., Array]:
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    """RMSNorm as Llama computes it: in float32, then scaled by `scale` (or `1 + scale`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    add_unit_offset: bool = False  # Gemma stores (scale - 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.add_unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.add_unit_offset:
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # Llama casts back to the input dtype before the weight multiply.
        return scale.astype(self.dtype) * x32.astype(self.dtype)


LORA_COLLECTION = "lora"


def add_lora(module: nn.Module, x: Array, y: Array) -> Array:
    """y + scaling * (x @ A) @ B when the call carries a LoRA adapter for this module.

    The adapter lives in the "lora" variable collection at this module's path
    (`lora_A` [in, r], `lora_B` [r, out], `scaling` []), so which adapter is active is
    simply which collection the caller passes: none = the base model. The base kernel is
    never merged or copied.
    """
    if not module.has_variable(LORA_COLLECTION, "lora_A"):
        return y
    a = module.get_variable(LORA_COLLECTION, "lora_A").astype(y.dtype)  # [in, r]
    b = module.get_variable(LORA_COLLECTION, "lora_B").astype(y.dtype)  # [r, out]
    scaling = jax.lax.stop_gradient(module.get_variable(LORA_COLLECTION, "scaling")).astype(y.dtype)
    return y + jnp.dot(jnp.dot(x.astype(y.dtype), a), b) * scaling


class Dense(nn.Module):
    """A linear layer with kernel [in, out] (torch's Linear weight transposed) and LoRA support.

    Every projection a PEFT adapter may target should use this (or `dense(...)`), so a
    LoRA adapter in the "lora" collection applies to it (see `add_lora`).
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return add_lora(self, x, y)


def dense(features: int, name: str, dtype: Any, param_dtype: Any, use_bias: bool = True,
          std: float = 0.02) -> Dense:
    """A LoRA-aware Dense layer whose kernel is [in, out] (the transpose of torch's Linear weight)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=normal_init(std), name=name)


def query_slots(seq_len: int, cache_index: Array | int) -> Array:
    """Cache slots of the current query tokens: [T] int32."""
    return jnp.arange(seq_len, dtype=jnp.int32) + jnp.asarray(cache_index, jnp.int32)


def default_positions(input_ids: Array, cache_index: Array | int) -> Array:
    """transformers' default position_ids [B, T]: the query slots (arange from the cache index),
    whatever the padding (GPT-2, GPT-Neo, GPT-NeoX, Llama; OPT derives its own from the mask)."""
    return jnp.broadcast_to(query_slots(input_ids.shape[1], cache_index), input_ids.shape)


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
    """Softmax attention with grouped KV heads; scores and softmax in float32.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv; bias: [B, 1, T, S].
    Returns [B, T, Hq, Dv] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, d)
    if t == 1:
        # A decode step. As an einsum, XLA (CPU) copies the whole [B, S, Hkv, D] cache into a
        # transposed layout on every step; a broadcast multiply-and-sum reads it in place.
        scores = jnp.sum(qg[:, :, None].astype(jnp.float32) * k[:, None, :, :, None].astype(jnp.float32), -1)
        scores = scores.transpose(0, 3, 4, 1, 2) * scale  # [B, 1, S, Hkv, G] -> [B, Hkv, G, 1, S]
    else:
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)[:, :, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None and not deterministic:
        probs = dropout(probs, deterministic=False)
    if t == 1:
        weights = probs.transpose(0, 3, 4, 1, 2)[:, 0, :, :, :, None]  # [B, S, Hkv, G, 1]
        out = jnp.sum(weights * v[:, :, :, None].astype(jnp.float32), axis=1).astype(v.dtype)  # [B, Hkv, G, Dv]
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, v.shape[-1])


def update_kv_cache(cache: KVCache, k: Array, v: Array, cache_index: Array) -> KVCache:
    """Write k, v [B, T, Hkv, D] into the cache at slot `cache_index` (same for all rows)."""
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, idx, zero, zero)),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, idx, zero, zero)),
    }


def empty_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: Any) -> KVCache:
    shape = (batch, max_len, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def make_stack(block_cls: type[nn.Module], num_layers: int, name: str, **kwargs: Any) -> LayerStack:
    """A LayerStack of `num_layers` `block_cls(layer_idx=i, **kwargs)` named like a ModuleList."""
    return LayerStack(functools.partial(block_cls, **kwargs), num_layers, name=name)
