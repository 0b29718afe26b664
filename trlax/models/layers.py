"""Layers shared by every trlax model family: activations, LoRA-aware Dense, RMSNorm, initialisers.

Every projection a PEFT adapter may target is a `Dense`, which adds the adapter held in
the "lora" variable collection at its path (see `add_lora`), with PEFT's `lora_dropout` on
the adapter's input in training forwards (see `drop_lora_inputs`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from trlax.errors import TrlaxError, UnsupportedModelError

Array = jax.Array


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
        raise UnsupportedModelError(
            f"activation {name!r} is not supported by trlax; supported: {sorted(ACTIVATIONS)}"
        ) from None


def torch_linear_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and bias)."""
    bound = 1.0 / (fan_in**0.5)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal_init(std: float) -> Callable[..., Array]:
    return nn.initializers.normal(stddev=std)


class ReadsStoredParams:
    """Mixed into trlax's Linen modules ahead of `nn.Module`: a param the params already hold is read as it is.

    Flax's `Module.param` checks a stored param by tracing its initialiser (`jax.eval_shape` of
    `init_fn(key, shape, dtype)`) at every trace: in a profile of tracing tiny Llama and GPT-2 forwards, over
    40% of the time, paid by every jitted program at its first call.
    Every trlax param is declared `self.param(name, init_fn, shape, dtype)`, so the stored value's shape is
    compared with `shape` directly, raising Flax's own ScopeParamShapeError; a missing param (`init`) and any
    other declaration go to Flax's `param`.
    """

    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any, unbox: bool = True,
              **init_kwargs: Any) -> Any:
        shape = init_args[0] if init_args else None
        if isinstance(shape, tuple) and self.has_variable("params", name):
            value = self.get_variable("params", name)
            if not isinstance(value, meta.AxisMetadata):
                if np.shape(value) != shape:
                    raise flax_errors.ScopeParamShapeError(name, self.scope.path_text, np.shape(value), shape)
                return value
        return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)


class RMSNorm(ReadsStoredParams, nn.Module):
    """RMSNorm as Llama computes it: in float32, then scaled by `scale` (or `1 + scale`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    add_unit_offset: bool = False  # Gemma stores (scale - 1)
    float32_weight: bool = False  # OLMo 2: the weight multiply in float32 too, then the cast

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.add_unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.add_unit_offset:
            return (x32 * (1.0 + broadcastable(scale, x.ndim).astype(jnp.float32))).astype(self.dtype)
        if self.float32_weight:
            return (broadcastable(scale, x.ndim).astype(jnp.float32) * x32).astype(self.dtype)
        # Llama casts back to the input dtype before the weight multiply.
        return broadcastable(scale, x.ndim).astype(self.dtype) * x32.astype(self.dtype)


def clamp_float16_overflow(x: Array, *, on_nan: bool = False) -> Array:
    """transformers' float16 overflow guard (T5 blocks; BART encoder layers with `on_nan`): a float16 `x`
    holding an inf (`on_nan`: any non-finite value) is clipped to +-(65504 - 1000), which float16 rounds
    to 64512. Other dtypes pass through untouched (decided when tracing)."""
    if x.dtype != jnp.float16:
        return x
    bad = ~jnp.isfinite(x) if on_nan else jnp.isinf(x)
    limit = jnp.asarray(jnp.finfo(jnp.float16).max - 1000, jnp.float16)
    return jnp.where(bad.any(), jnp.clip(x, -limit, limit), x)


LORA_COLLECTION = "lora"

# Set by `FlaxPreTrainedModel.apply_module` while a training forward is traced: PEFT's lora_dropout rate.
_LORA_DROPOUT: contextvars.ContextVar[float] = contextvars.ContextVar("trlax_lora_dropout", default=0.0)


def check_lora_dropout(rate: Any) -> None:
    """TrlaxError unless `rate` (PEFT's lora_dropout) is a number in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise TrlaxError(f"lora_dropout must be in [0, 1); got {rate!r}")


@contextlib.contextmanager
def drop_lora_inputs(rate: float) -> Iterator[None]:
    """While tracing under this context, `add_lora` applies dropout at `rate` (in [0, 1); 0: none, and no random
    op is traced) to the input of every LoRA branch, with keys from the "dropout" rng stream."""
    check_lora_dropout(rate)
    token = _LORA_DROPOUT.set(float(rate))
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


def add_lora(module: nn.Module, x: Array, y: Array) -> Array:
    """y + scaling * (dropout(x) @ A) @ B when the call carries a LoRA adapter for this module.

    The adapter lives in the "lora" variable collection at this module's path
    (`lora_A` [in, r], `lora_B` [r, out], `scaling` []), so which adapter is active is
    simply which collection the caller passes: none = the base model. The base kernel is
    never merged or copied. x: the layer's input [..., in]; y: the base projection's output
    [..., out] (computed from the undropped x), in the compute dtype, which the result keeps.

    dropout is PEFT's `lora_dropout` under `drop_lora_inputs(rate)` (a training forward): inverted
    dropout of x as torch's and Flax's nn.Dropout (each element kept with probability 1 - rate,
    then scaled by 1 / (1 - rate)), on the LoRA branch only, with a key from this module's
    `make_rng("dropout")` (which folds in the module path, so every adapted layer draws its own
    mask). Outside that context, or at rate 0, x passes as it is.
    """
    if not module.has_variable(LORA_COLLECTION, "lora_A"):
        return y
    a = module.get_variable(LORA_COLLECTION, "lora_A").astype(y.dtype)  # [in, r]
    b = module.get_variable(LORA_COLLECTION, "lora_B").astype(y.dtype)  # [r, out]
    scaling = jax.lax.stop_gradient(module.get_variable(LORA_COLLECTION, "scaling")).astype(y.dtype)
    x = x.astype(y.dtype)  # [..., in]
    rate = _LORA_DROPOUT.get()
    if rate:
        keep_prob = 1.0 - rate
        keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, x.shape)  # [..., in] bool
        x = jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
    return y + jnp.dot(jnp.dot(x, a), b) * scaling


def broadcastable(v: Array, ndim: int) -> Array:
    """`v` with leading size-1 dims up to rank `ndim`: the broadcast a rank promotion does, written out, so
    trlax runs under jax_numpy_rank_promotion="raise"."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out] in x's dtype, accumulated and returned by the dot in float32.

    Asking for a float32 result keeps low-precision operands low-precision on XLA:CPU: a
    bfloat16 dot with a bfloat16 result is rewritten to convert both operands (the whole
    weight) to float32 on every call, while bf16 x bf16 -> f32 runs as it is.
    """
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def take_rows(table: Array, ids: Array) -> Array:
    """table[ids]: rows [..., H] of a 16-bit float table [V, H], gathered as their uint16 bits (XLA:CPU
    gathers floats only in float32, and would convert the whole table to look up a few rows). The
    gradient is the float gather's: a bitcast has none, so the backward pass is jnp.take's own."""
    rows = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return jax.lax.bitcast_convert_type(rows, table.dtype)


def _take_rows_forward(table: Array, ids: Array) -> tuple[Array, tuple[Array, Array]]:
    return take_rows(table, ids), (table, ids)


def _take_rows_backward(residuals: tuple[Array, Array], rows_grad: Array) -> tuple[Array, None]:
    table, ids = residuals  # the table only for its shape: the gather's transpose reads no values
    _, pullback = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
    return pullback(rows_grad)[0], None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


class Embed(ReadsStoredParams, nn.Embed):
    """`nn.Embed` for XLA:CPU's sake, same params and results.

    - The lookup of a 16-bit float table gathers its bits as uint16: XLA:CPU gathers floats
      only in float32, and would convert the whole table to float32 to look up a few rows.
    - `attend` (a tied LM head) reads the [V, H] table as stored and accumulates in float32:
      h [..., H] -> logits [..., V] in the compute dtype, with no transposed copy of the table.

    `padding_idx` is torch's: the lookups of that id pass no gradient to the table (its row
    still reaches the logits of a tied head); the forward pass is unchanged.
    """

    padding_idx: int | None = None

    def __call__(self, inputs: Array) -> Array:
        (table,) = promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        if not (jnp.issubdtype(inputs.dtype, jnp.integer) and jnp.issubdtype(table.dtype, jnp.floating)
                and table.dtype.itemsize == 2):
            rows = super().__call__(inputs)
        else:
            rows = take_rows(table, inputs)
        if self.padding_idx is None:
            return rows
        pad = self.padding_idx + (self.num_embeddings if self.padding_idx < 0 else 0)  # as torch reads a negative one
        return jnp.where((inputs == pad)[..., None], jax.lax.stop_gradient(rows), rows)

    def attend(self, query: Array) -> Array:
        query, embedding = promote_dtype(query, self.embedding, dtype=self.dtype)
        dims = (((query.ndim - 1,), (1,)), ((), ()))
        return jax.lax.dot_general(query, embedding, dims, preferred_element_type=jnp.float32).astype(query.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def two_pass_layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis of x [..., F] (scale, bias: the
    trailing dims of x, [F] or [..., F]), computed and returned in float32 (as Flax's LayerNorm, whose
    caller casts to its dtype).

    The variance in two passes, mean((x - mean)^2), as torch computes it: E[x^2] - E[x]^2 (Flax's
    default) loses float32 digits when a vector's mean is large against its spread (1e-3 off at
    mean/std 50). The backward pass is the closed form (two fused reductions): autodiff of the two
    passes made XLA:CPU's GPT-2-small PPO step 1.5x slower than with the one-pass variance.
    """
    return _layer_norm_forward(x, scale, bias, eps)[0]


def _layer_norm_forward(x: Array, scale: Array, bias: Array,
                        eps: float) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    # Flax's order: (x - mean) * (rsqrt(var + eps) * scale) + bias
    y = centered * (inv_std * broadcastable(scale, x.ndim)) + broadcastable(bias, x.ndim)
    return y, (x, mean, inv_std, scale)


def _layer_norm_backward(eps: float, residuals: tuple[Array, Array, Array, Array],
                         y_grad: Array) -> tuple[Array, Array, Array]:
    x, mean, inv_std, scale = residuals
    normed = (x.astype(jnp.float32) - mean) * inv_std
    y_grad = y_grad.astype(jnp.float32)
    g = y_grad * broadcastable(scale, y_grad.ndim)
    x_grad = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True)
                        - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    scale_grad = (y_grad * normed).reshape(-1, *scale.shape).sum(0)
    bias_grad = y_grad.reshape(-1, *scale.shape).sum(0)
    return x_grad.astype(x.dtype), scale_grad.astype(scale.dtype), bias_grad.astype(scale.dtype)


two_pass_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(ReadsStoredParams, nn.LayerNorm):
    """`nn.LayerNorm` (same params, float32 statistics, output in `dtype`) as torch computes it: see
    `two_pass_layer_norm`. Normalises over the last axis; `feature_axes` -1 or (-2, -1) (Cohere's
    per-head q/k norms); no `mask`."""

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        axes = (self.feature_axes,) if isinstance(self.feature_axes, int) else tuple(self.feature_axes)
        if self.reduction_axes not in (-1, (-1,)) or axes not in ((-1,), (-2, -1)) or mask is not None:
            raise TrlaxError("trlax's LayerNorm normalises over the last axis, with feature_axes -1 or (-2, -1) "
                             "and no mask")
        shape = x.shape[-len(axes):]
        scale = (self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale
                 else jnp.ones(shape, self.param_dtype))
        bias = (self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias
                else jnp.zeros(shape, self.param_dtype))
        return two_pass_layer_norm(x, scale, bias, self.epsilon).astype(self.dtype or x.dtype)


class Dense(ReadsStoredParams, nn.Module):
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
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + broadcastable(bias, y.ndim).astype(self.dtype)
        return add_lora(self, x, y)


def initializer_range(config: Any) -> float:
    """The std of a family's normal initialiser (`initializer_range`; OPT and BART call it `init_std`)."""
    return getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02


class HFModule(ReadsStoredParams, nn.Module):
    """Base of the family modules: built from a transformers config, with compute and param dtypes.

    Its helpers make the PyTorch-named submodules with the module's dtypes and the family's
    initialiser, so a family's `setup` reads like the PyTorch `__init__` it mirrors.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def linear(self, features: int, use_bias: bool = True, std: float | None = None,
               name: str | None = None) -> Dense:
        """A LoRA-aware Dense (kernel [in, out]) initialised N(0, std), std = the config's by default."""
        std = initializer_range(self.config) if std is None else std
        return Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=normal_init(std), name=name)

    def embedding(self, num: int, features: int, std: float | None = None, padding_idx: int | None = None) -> Embed:
        """An embedding [num, features] initialised N(0, std); padding_idx: torch's (see `Embed`)."""
        std = initializer_range(self.config) if std is None else std
        return Embed(num, features, dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=normal_init(std),
                     padding_idx=padding_idx)

    def layer_norm(self, eps: float, name: str | None = None, **kwargs: Any) -> nn.LayerNorm:
        """torch's LayerNorm (two-pass variance; see `LayerNorm`)."""
        return LayerNorm(eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs)

    def rms_norm(self, eps: float, add_unit_offset: bool = False, float32_weight: bool = False) -> RMSNorm:
        return RMSNorm(eps=eps, dtype=self.dtype, param_dtype=self.param_dtype, add_unit_offset=add_unit_offset,
                       float32_weight=float32_weight)


class FeedForward(HFModule, kw_only=True):
    """`outer(act(inner(x)))`, [B, T, H] -> [B, T, H], then a dropout when `dropout_rate` is set.

    `names` are the family's HF names of the two projections (GPT-2's ("c_fc", "c_proj"),
    GPT-NeoX's ("dense_h_to_4h", "dense_4h_to_h"), Phi's ("fc1", "fc2"), ...), created in that
    order, the order PyTorch registers them. `hidden_act`: a transformers activation name or
    the function itself (BLOOM's own GELU).
    """

    names: tuple[str, str]
    features: int
    hidden_act: str | Callable[[Array], Array]
    use_bias: bool = True
    dropout_rate: float = 0.0

    def setup(self) -> None:
        inner, outer = self.names
        setattr(self, inner, self.linear(self.features, self.use_bias))
        setattr(self, outer, self.linear(self.config.hidden_size, self.use_bias))
        self.act = activation(self.hidden_act) if isinstance(self.hidden_act, str) else self.hidden_act
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        inner, outer = self.names
        return self.dropout(getattr(self, outer)(self.act(getattr(self, inner)(x))), deterministic=deterministic)
