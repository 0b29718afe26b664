"""The Llama family (`model_type` llama, mistral, qwen2, qwen3) in Flax Linen, with HF names.

Param paths match transformers' `*ForCausalLM` state dicts: `model.embed_tokens`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head` (absent when
`tie_word_embeddings`). RoPE keeps HF's rotate-half layout, so q/k weights load as they are.

The four model types differ only in a few switches, gathered in `DecoderOptions`: which
projections carry a bias, Qwen3's per-head q/k RMSNorm, and which layers use a sliding
window (Mistral: all, when `sliding_window` is set; Qwen2/3: those `layer_types` marks
"sliding_attention"). Gemma (trlax/models/gemma.py) reuses these modules with its own options.

Sliding windows follow HF's rule on cache slots, not on position ids: a query in slot q
sees keys in slots q - W < k <= q, so left-pad slots count toward the window exactly as
they do in transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.layers import (
    Array,
    Dense,
    KVCache,
    RMSNorm,
    activation,
    attention_bias,
    default_positions,
    dot_product_attention,
    empty_kv_cache,
    make_stack,
    normal_init,
    query_slots,
    update_kv_cache,
)
from trlax.models.outputs import CausalLMOutput
from trlax.models.rope import apply_rotary, inv_frequencies, rope_parameters, rotary_cos_sin
from trlax.models.spec import ArchitectureSpec


@dataclass(frozen=True)
class DecoderOptions:
    """The switches that tell the Llama-style model types apart (derived from a config)."""

    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    sliding: tuple[bool, ...]  # per layer: does it use `sliding_window`?
    sliding_window: int | None
    qk_norm: bool = False  # Qwen3: RMSNorm over each q/k head before RoPE
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of the logits
    norm_unit_offset: bool = False  # Gemma: RMSNorm weight is stored as (scale - 1)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_layers(config: Any) -> tuple[bool, ...]:
    """Which layers use a sliding window, read from `layer_types` as transformers does.

    Raises UnsupportedModelError for a layer type other than full/sliding attention, or a
    sliding layer without a `sliding_window` (transformers fails on that config too).
    """
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer, when set
        return (getattr(config, "sliding_window", None) is not None,) * n
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(
            f"layer_types {unknown} are not supported by trlax ({config.model_type}); "
            "supported: 'full_attention', 'sliding_attention'"
        )
    sliding = tuple(t == "sliding_attention" for t in layer_types[:n])
    if any(sliding) and getattr(config, "sliding_window", None) is None:
        raise UnsupportedModelError(
            f"{config.model_type} config marks layers as 'sliding_attention' but sets no `sliding_window` "
            "(for Qwen2/Qwen3 set use_sliding_window=True and sliding_window); transformers rejects it too"
        )
    return sliding


def check_causal(config: Any) -> None:
    """Refuse configs that turn transformers' masks bidirectional (embedding-model variants)."""
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise UnsupportedModelError(
            f"{config.model_type} with bidirectional attention (use_bidirectional_attention=True or "
            "is_causal=False) is not supported by trlax's causal LMs; use a causal config"
        )


def llama_options(config: Any) -> DecoderOptions:
    """DecoderOptions for llama, mistral, qwen2 and qwen3 configs (as their HF modules build them)."""
    check_causal(config)
    mt = config.model_type
    attention_bias = bool(getattr(config, "attention_bias", False))
    if mt == "llama":
        qkv_bias = o_bias = attention_bias
    elif mt == "mistral":  # MistralAttention hard-codes bias=False
        qkv_bias = o_bias = False
    elif mt == "qwen2":  # q/k/v always biased, o never
        qkv_bias, o_bias = True, False
    elif mt == "qwen3":
        qkv_bias = o_bias = attention_bias
    else:
        raise UnsupportedModelError(f"model_type {mt!r} is not a Llama-family model")
    sliding = sliding_layers(config)
    return DecoderOptions(
        head_dim=head_dim_of(config),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)) if mt == "llama" else False,
        hidden_act=config.hidden_act,
        sliding=sliding,
        sliding_window=config.sliding_window if any(sliding) else None,
        qk_norm=mt == "qwen3",
    )


def _linear(features: int, use_bias: bool, config: Any, dtype: Any, param_dtype: Any) -> Dense:
    """A torch-Linear-like, LoRA-aware Dense (kernel [in, out]) with HF's normal(initializer_range) init."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=normal_init(config.initializer_range))


def rms_norm(config: Any, options: DecoderOptions, dtype: Any, param_dtype: Any) -> RMSNorm:
    """The family's RMSNorm over the hidden size (Gemma's stores scale - 1)."""
    return RMSNorm(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                   add_unit_offset=options.norm_unit_offset)


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE; the cache holds the (rotated) keys of the KV heads."""

    config: Any
    options: DecoderOptions
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, o = self.config, self.options
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.q_proj = _linear(self.num_heads * o.head_dim, o.qkv_bias, c, self.dtype, self.param_dtype)
        self.k_proj = _linear(self.num_kv_heads * o.head_dim, o.qkv_bias, c, self.dtype, self.param_dtype)
        self.v_proj = _linear(self.num_kv_heads * o.head_dim, o.qkv_bias, c, self.dtype, self.param_dtype)
        self.o_proj = _linear(c.hidden_size, o.o_bias, c, self.dtype, self.param_dtype)
        if o.qk_norm:
            # Qwen3's q/k norms are plain RMSNorms over the head dim, even in Gemma-style configs.
            self.q_norm = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            self.k_norm = RMSNorm(eps=c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.attn_dropout = nn.Dropout(getattr(c, "attention_dropout", 0.0) or 0.0)

    def __call__(
        self, x: Array, cos: Array, sin: Array, bias: Array, deterministic: bool,
        cache: KVCache | None, cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        o = self.options
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, o.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, o.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, o.head_dim)
        if o.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, Hkv, D]
        scale = o.attn_scale if o.attn_scale is not None else o.head_dim**-0.5
        out = dot_product_attention(q, k, v, bias, scale=scale, dropout=self.attn_dropout,
                                    deterministic=deterministic, softcap=o.attn_softcap)
        return self.o_proj(out.reshape(b, t, self.num_heads * o.head_dim)), cache


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU for Llama, GeGLU for Gemma)."""

    config: Any
    options: DecoderOptions
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, o = self.config, self.options
        self.gate_proj = _linear(c.intermediate_size, o.mlp_bias, c, self.dtype, self.param_dtype)
        self.up_proj = _linear(c.intermediate_size, o.mlp_bias, c, self.dtype, self.param_dtype)
        self.down_proj = _linear(c.hidden_size, o.mlp_bias, c, self.dtype, self.param_dtype)
        self.act = activation(o.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: Any
    options: DecoderOptions
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, o = self.config, self.options
        self.self_attn = LlamaAttention(c, o, self.layer_idx, self.dtype, self.param_dtype)
        self.mlp = LlamaMLP(c, o, self.dtype, self.param_dtype)
        self.input_layernorm = rms_norm(c, o, self.dtype, self.param_dtype)
        self.post_attention_layernorm = rms_norm(c, o, self.dtype, self.param_dtype)

    def __call__(
        self, x: Array, cos: Array, sin: Array, bias: Array, deterministic: bool,
        cache: KVCache | None, cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, bias, deterministic, cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class LlamaModel(nn.Module):
    config: Any
    options: DecoderOptions
    layer_cls: type[nn.Module]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c, o = self.config, self.options
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=normal_init(c.initializer_range))
        self.layers = make_stack(self.layer_cls, c.num_hidden_layers, "layers", config=c, options=o,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = rms_norm(c, o, self.dtype, self.param_dtype)
        self.inv_freq = inv_frequencies(c, o.head_dim)  # [D/2] float32, a constant (not a param)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array,
        deterministic: bool,
        output_hidden_states: bool,
        cache: list[KVCache] | None,
        cache_index: Array,
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        o = self.options
        x = self.embed_tokens(input_ids)  # [B, T, H] compute dtype
        if o.embed_scale:  # Gemma: the scale is rounded to the compute dtype first, as HF does
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq)  # [B, T, D] float32
        slots = query_slots(input_ids.shape[1], cache_index)
        full_bias = attention_bias(attention_mask, slots)  # [B, 1, T, S]
        sliding_bias = (attention_bias(attention_mask, slots, sliding_window=o.sliding_window)
                        if any(o.sliding) else None)
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, layer in enumerate(self.layers.blocks):
            hidden.append(x)
            bias = sliding_bias if o.sliding[i] else full_bias
            x, layer_cache = layer(x, cos, sin, bias, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = self.norm(x)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class LlamaForCausalLM(nn.Module):
    """A Llama-family LM with its head. Inputs and outputs: see `trlax.models.outputs.CausalLMOutput`.

    Subclasses (Gemma) swap `make_options` and `layer_cls_for`; everything else is shared.
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    make_options: ClassVar[Callable[[Any], DecoderOptions]] = staticmethod(llama_options)
    layer_cls_for: ClassVar[Callable[[Any], type[nn.Module]]] = staticmethod(lambda config: LlamaDecoderLayer)

    def setup(self) -> None:
        c = self.config
        self.options = self.make_options(c)
        self.model = LlamaModel(c, self.options, self.layer_cls_for(c), self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=normal_init(c.initializer_range))

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> CausalLMOutput:
        if position_ids is None:  # transformers' default: arange from the cache position
            position_ids = default_positions(input_ids, cache_index)
        h, hidden, cache = self.model(
            input_ids, attention_mask, position_ids, deterministic, output_hidden_states, cache,
            jnp.asarray(cache_index, jnp.int32),
        )
        logits = self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        if self.options.final_softcap is not None:  # in the compute dtype, as transformers does
            cap = self.options.final_softcap
            logits = jnp.tanh(logits / cap) * cap
        return CausalLMOutput(logits=logits.astype(jnp.float32), last_hidden_state=h,
                              hidden_states=hidden, cache=cache)


def validate_rope(config: Any) -> None:
    """Fail at construction, not at the first forward, on RoPE settings trlax does not implement."""
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        # transformers would rotate only part of each head and then fail on the shape mismatch.
        raise UnsupportedModelError(
            f"{config.model_type}: partial_rotary_factor={params['partial_rotary_factor']} with rope_type "
            f"{params['rope_type']!r} is not supported by trlax (transformers cannot run it either)"
        )
    inv_frequencies(config, head_dim_of(config))


def _validate(config: Any) -> None:
    validate_rope(config)
    llama_options(config)


def init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    """One {"k", "v"} [B, S, Hkv, D] per layer: GQA caches hold the KV heads only."""
    return [empty_kv_cache(batch, max_len, config.num_key_value_heads, head_dim_of(config), dtype)
            for _ in range(config.num_hidden_layers)]


def tied_lm_head(config: Any) -> tuple[str, ...]:
    """`lm_head.weight` aliases `model.embed_tokens.weight` when the embeddings are tied."""
    return ("lm_head.weight",) if config.tie_word_embeddings else ()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Older checkpoints carry RoPE buffers; transformers recomputes them and ignores these keys.
ROTARY_BUFFERS = (r".*\.rotary_emb\.inv_freq$", r".*\.rotary_emb\.original_inv_freq$")


SPEC = ArchitectureSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    module=LlamaForCausalLM,
    hf_architecture="LlamaForCausalLM",
    num_layers=lambda c: c.num_hidden_layers,
    layer_pattern="model.layers.{layer}",
    init_cache=init_cache,
    ignored_keys=ROTARY_BUFFERS,
    tied_keys=tied_lm_head,
    validate=_validate,
    lora_targets=LORA_TARGETS,
)
