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
from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.rope import attention_scaling, inv_frequencies, rope_parameters, rotary_cos_sin
from trlax.models.self_attention import SelfAttention, head_dim_of
from trlax.models.spec import (
    ArchitectureSpec,
    ParamRule,
    attention_rules,
    embedding_rules,
    feed_forward_rules,
    tied_lm_head,
)
from trlax.models.stack import layer_stack


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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each q/k head before RoPE
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of the logits
    norm_unit_offset: bool = False  # Gemma: RMSNorm weight is stored as (scale - 1)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    partial_rotary_factor: float = 1.0  # Phi-3, GLM: RoPE on the first fraction of each head only
    embed_dropout: float = 0.0  # StarCoder2: dropout on the embeddings
    resid_dropout: float = 0.0  # Phi-3, StarCoder2: dropout on the attention and MLP outputs
    eager_attention: bool = False  # Gemma 2: transformers runs eager attention (see `dot_product_attention`)

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer (None: full attention)."""
        return self.sliding_window if self.sliding[layer_idx] else None


def sliding_layers(config: Any) -> tuple[bool, ...]:
    """Which layers use a sliding window, read from `layer_types` as transformers does.

    Raises UnsupportedModelError for a layer type other than full/sliding attention, or a
    sliding layer without a `sliding_window` (transformers fails on that config too).
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer, when set
        return sliding_everywhere(config)["sliding"]
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(
            f"layer_types {unknown} are not supported by trlax ({config.model_type}); "
            "supported: 'full_attention', 'sliding_attention'"
        )
    if len(layer_types) < config.num_hidden_layers:
        raise UnsupportedModelError(
            f"{config.model_type} config has {len(layer_types)} layer_types for num_hidden_layers="
            f"{config.num_hidden_layers}: give every layer its type (transformers requires one per layer)"
        )
    sliding = tuple(t == "sliding_attention" for t in layer_types[:config.num_hidden_layers])
    if any(sliding) and getattr(config, "sliding_window", None) is None:
        raise UnsupportedModelError(
            f"{config.model_type} config marks layers as 'sliding_attention' but sets no `sliding_window` "
            "(for Qwen2/Qwen3 set use_sliding_window=True and sliding_window); transformers rejects it too"
        )
    return sliding


LAYER_TYPES = {False: "full_attention", True: "sliding_attention"}  # is the layer sliding? -> its type


def check_causal(config: Any) -> None:
    """Refuse configs that turn transformers' masks bidirectional (embedding-model variants)."""
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise UnsupportedModelError(
            f"{config.model_type} with bidirectional attention (use_bidirectional_attention=True or "
            "is_causal=False) is not supported by trlax's causal LMs; use a causal config"
        )


def decoder_options(config: Any, **switches: Any) -> DecoderOptions:
    """DecoderOptions with the head dim, activation (`hidden_act`) and sliding layers read from the config
    as transformers reads them, and the family's other `switches`."""
    read = {"head_dim": head_dim_of(config), "hidden_act": getattr(config, "hidden_act", None)}
    if "sliding" not in switches:  # else the family's own rule (`without_sliding`, `sliding_everywhere`)
        sliding = sliding_layers(config)
        read.update(sliding=sliding, sliding_window=config.sliding_window if any(sliding) else None)
    return DecoderOptions(**{**read, **switches})


def without_sliding(config: Any) -> dict[str, Any]:
    """DecoderOptions switches of a model type transformers gives no sliding window (Llama, Granite, OLMo 2, GLM),
    whatever stray `sliding_window` its config.json holds (transformers ignores it there)."""
    return {"sliding": (False,) * config.num_hidden_layers, "sliding_window": None}


def sliding_everywhere(config: Any) -> dict[str, Any]:
    """DecoderOptions switches of a model type whose transformers attention slides every layer when
    `sliding_window` is set (Mistral, Mixtral, Qwen3-MoE, Phi-3, StarCoder2), whatever `layer_types` its
    config.json holds (transformers ignores them there)."""
    window = getattr(config, "sliding_window", None)
    return {"sliding": (window is not None,) * config.num_hidden_layers, "sliding_window": window}


def configured_options(config: Any, **switches: Any) -> DecoderOptions:
    """DecoderOptions of a Llama-like family that reads its biases as Llama does: causal configs only,
    q/k/v/o biased per `attention_bias`, the MLP per `mlp_bias`; the family's `switches` on top."""
    check_causal(config)
    bias = bool(getattr(config, "attention_bias", False))
    read = {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(getattr(config, "mlp_bias", False))}
    return decoder_options(config, **{**read, **switches})


# Per model type, its switches on top of the biases `configured_options` reads as Llama does.
LLAMA_SWITCHES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "llama": without_sliding,
    # MistralAttention hard-codes bias=False
    "mistral": lambda config: {"qkv_bias": False, "o_bias": False, "mlp_bias": False, **sliding_everywhere(config)},
    "qwen2": lambda config: {"qkv_bias": True, "o_bias": False, "mlp_bias": False},  # q/k/v always biased, o never
    "qwen3": lambda config: {"mlp_bias": False, "qk_norm": True},
}


def llama_options(config: Any) -> DecoderOptions:
    """DecoderOptions for llama, mistral, qwen2 and qwen3 configs (as their HF modules build them)."""
    check_causal(config)
    switches = LLAMA_SWITCHES.get(config.model_type)
    if switches is None:
        raise UnsupportedModelError(f"model_type {config.model_type!r} is not a Llama-family model")
    return configured_options(config, **switches(config))


class LlamaAttention(SelfAttention, kw_only=True):
    """GQA self-attention with RoPE; the cache holds the (rotated) keys of the KV heads."""

    options: DecoderOptions

    def setup(self) -> None:
        c, o = self.config, self.options
        self.q_proj = self.linear(c.num_attention_heads * o.head_dim, o.qkv_bias)
        self.k_proj = self.linear(c.num_key_value_heads * o.head_dim, o.qkv_bias)
        self.v_proj = self.linear(c.num_key_value_heads * o.head_dim, o.qkv_bias)
        self.o_proj = self.linear(c.hidden_size, o.o_bias)
        if o.qk_norm:
            # RMSNorms over the head dim: Qwen3's plain, Gemma 3's with its (1 + w) weights.
            self.q_norm = self.rms_norm(c.rms_norm_eps, o.norm_unit_offset)
            self.k_norm = self.rms_norm(c.rms_norm_eps, o.norm_unit_offset)
        self.attention_dropout = nn.Dropout(getattr(c, "attention_dropout", 0.0) or 0.0)

    def head_counts(self) -> tuple[int, int, int]:
        return self.config.num_attention_heads, self.config.num_key_value_heads, self.options.head_dim

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        return (self.q_norm(q), self.k_norm(k)) if self.options.qk_norm else (q, k)

    def scale(self) -> float:
        return self.options.attn_scale if self.options.attn_scale is not None else self.options.head_dim**-0.5

    def softcap(self) -> float | None:
        return self.options.attn_softcap

    def zero_unseen_queries(self) -> bool:
        return not self.options.eager_attention


class LlamaMLP(HFModule, kw_only=True):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU for Llama, GeGLU for Gemma)."""

    options: DecoderOptions

    def setup(self) -> None:
        c, o = self.config, self.options
        self.gate_proj = self.linear(c.intermediate_size, o.mlp_bias)
        self.up_proj = self.linear(c.intermediate_size, o.mlp_bias)
        self.down_proj = self.linear(c.hidden_size, o.mlp_bias)
        self.act = activation(o.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def decoder_norm(module: HFModule, options: DecoderOptions) -> nn.Module:
    """The norm of a Llama-style block or final state: RMSNorm ((1 + w) for Gemma)."""
    return module.rms_norm(module.config.rms_norm_eps, options.norm_unit_offset)


class LlamaDecoderLayer(HFModule, kw_only=True):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    Subclasses swap the attention / MLP classes (Phi-3's fused projections, StarCoder2's
    GELU MLP) and `make_norm` (StarCoder2's LayerNorm), or wrap the sublayers through the
    `attention` and `feed_forward` hooks (SmolLM3's NoPE layers, GLM-4's output norms).
    """

    options: DecoderOptions
    layer_idx: int = 0
    attention_cls: ClassVar[type[nn.Module]] = LlamaAttention
    make_norm: ClassVar[Callable[[HFModule, DecoderOptions], nn.Module]] = staticmethod(decoder_norm)

    def setup(self) -> None:
        c, o = self.config, self.options
        kw = {"config": c, "options": o, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.self_attn = self.attention_cls(**kw, layer_idx=self.layer_idx)
        self.mlp = self.make_mlp()
        self.input_layernorm = self.make_norm(self, o)
        self.post_attention_layernorm = self.make_norm(self, o)
        self.resid_dropout = nn.Dropout(o.resid_dropout)

    def make_mlp(self) -> nn.Module:
        """The block's `mlp` (Phi-3: fused gate/up; StarCoder2: a plain GELU feed-forward)."""
        return LlamaMLP(config=self.config, options=self.options, dtype=self.dtype, param_dtype=self.param_dtype)

    def attention(self, x: Array, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                  cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        """Self-attention over this layer's mask (full or sliding window)."""
        bias = masks[self.options.window(self.layer_idx)]
        return self.self_attn(x, bias, rotary, deterministic, cache, cache_index)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        attn_out, cache = self.attention(self.input_layernorm(x), masks, rotary, deterministic, cache, cache_index)
        x = x + self.residual_branch(attn_out, deterministic)
        return x + self.residual_branch(self.feed_forward(x), deterministic), cache

    def feed_forward(self, x: Array) -> Array:
        """The MLP sublayer on the residual stream x [B, T, H]: mlp(norm(x)) (GLM-4 normalises its output too)."""
        return self.mlp(self.post_attention_layernorm(x))

    def residual_branch(self, out: Array, deterministic: bool) -> Array:
        """A sublayer's output as the residual stream adds it (Granite scales it instead of the dropout)."""
        return self.resid_dropout(out, deterministic=deterministic)


class LlamaModel(DecoderBackbone):
    """Subclasses (Gemma, Phi-3, StarCoder2) swap `make_options`, `layer_cls_for` and `make_norm`;
    everything else is shared."""

    layout = BackboneLayout(embedding="embed_tokens", final_norm="norm", norm_eps="rms_norm_eps", padding_idx=True)

    make_options: ClassVar[Callable[[Any], DecoderOptions]] = staticmethod(llama_options)
    layer_cls_for: ClassVar[Callable[[Any], type[nn.Module]]] = staticmethod(lambda config: LlamaDecoderLayer)
    make_norm: ClassVar[Callable[[HFModule, DecoderOptions], nn.Module]] = staticmethod(decoder_norm)

    def setup(self) -> None:
        c = self.config
        self.options = self.make_options(c)
        self.embed_tokens = self.token_embedding(c.hidden_size)
        self.layers = layer_stack(self.layer_cls_for(c), c.num_hidden_layers, "layers", config=c,
                                  options=self.options, dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = self.make_norm(self, self.options)
        self.embed_dropout = nn.Dropout(self.options.embed_dropout)
        self.inv_freq = self.inverse_frequencies()  # constants, not params

    def inverse_frequencies(self) -> Any:
        """RoPE inverse frequencies [rot_dim / 2] float32 (Gemma 3: one array per layer type)."""
        return inv_frequencies(self.config, self.options.head_dim, self.options.partial_rotary_factor)

    def rotary(self, position_ids: Array) -> Any:
        """cos, sin [B, T, rot_dim] float32 for positions [B, T] (Gemma 3: a pair per layer type)."""
        return rotary_cos_sin(position_ids, self.inv_freq, scaling=attention_scaling(self.config))

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        x = self.embed_tokens(input_ids)  # [B, T, H] compute dtype
        if self.options.embed_scale:  # Gemma: the scale is rounded to the compute dtype first, as HF does
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        return self.embed_dropout(x, deterministic=deterministic)

    def layer_windows(self) -> list[int | None]:
        return [self.options.window(i) for i in range(self.config.num_hidden_layers)]


class PerLayerTypeRope:
    """A LlamaModel mixin for configs whose `rope_parameters` hold one dict per layer type (Gemma 3, OLMo 3):
    one RoPE table per layer type present; a layer reads `rotary[layer_type_of(options, layer_idx)]`."""

    config: Any
    options: DecoderOptions
    inv_freq: Any

    def inverse_frequencies(self) -> dict[str, Any]:
        """Layer type -> its inverse frequencies [D / 2] float32."""
        return {t: inv_frequencies(self.config, self.options.head_dim, layer_type=t)
                for t in sorted({LAYER_TYPES[s] for s in self.options.sliding})}

    def rotary(self, position_ids: Array) -> dict[str, tuple[Array, Array]]:
        """Layer type -> cos, sin [B, T, D] float32."""
        return {t: rotary_cos_sin(position_ids, inv_freq, scaling=attention_scaling(self.config, t))
                for t, inv_freq in self.inv_freq.items()}


def layer_type_of(options: DecoderOptions, layer_idx: int) -> str:
    """The `layer_types` entry of a layer: "sliding_attention" or "full_attention"."""
    return LAYER_TYPES[options.sliding[layer_idx]]


class LlamaForCausalLM(CausalLM):
    """A Llama-family LM with its head (Gemma 2 soft-caps its logits)."""

    backbone_cls = LlamaModel
    backbone_name = "model"

    def logits(self, h: Array) -> Array:
        logits = super().logits(h)
        cap = self.model.options.final_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap  # in the compute dtype, as transformers


def checked_by_options(make_options: Callable[[Any], DecoderOptions]) -> Callable[[Any], None]:
    """A Llama-like family's `validate`: its RoPE settings, activation and options, checked when the model is
    built (UnsupportedModelError) rather than at the first forward."""

    def validate(config: Any) -> None:
        validate_rope(config)
        activation(config.hidden_act)
        make_options(config)

    return validate


def validate_rope(config: Any, layer_type: str | None = None) -> None:
    """Fail at construction, not at the first forward, on RoPE settings trlax does not implement
    (`layer_type`: those of one layer type, where `rope_parameters` holds one dict per type)."""
    params = rope_parameters(config, layer_type)
    if params["rope_type"] != "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        # transformers would rotate only part of each head and then fail on the shape mismatch.
        raise UnsupportedModelError(
            f"{config.model_type}: partial_rotary_factor={params['partial_rotary_factor']} with rope_type "
            f"{params['rope_type']!r} is not supported by trlax (transformers cannot run it either)"
        )
    inv_frequencies(config, head_dim_of(config), layer_type=layer_type)


LLAMA_SHARDING: tuple[ParamRule, ...] = (
    *embedding_rules("embed_tokens"),
    *attention_rules("self_attn", "q_proj", "[kv]_proj", "o_proj", kv_axis="kv_heads"),
    *feed_forward_rules("(gate|up)_proj", "down_proj"),
)
# Older checkpoints carry RoPE buffers; transformers recomputes them and ignores these keys.
ROTARY_BUFFERS = (r".*\.rotary_emb\.inv_freq$", r".*\.rotary_emb\.original_inv_freq$")


def cache_geometry(config: Any) -> CacheGeometry:
    """GQA caches hold the KV heads only."""
    return CacheGeometry(config.num_hidden_layers, config.num_key_value_heads, head_dim_of(config))


SPEC = ArchitectureSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"), module=LlamaForCausalLM, hf_architecture="LlamaForCausalLM",
    base_model_prefix="model", layer_pattern="model.layers.{layer}",
    cache_geometry=cache_geometry, sharding_rules=LLAMA_SHARDING, peft_targets=("q_proj", "v_proj"),
    ignored_keys=ROTARY_BUFFERS, tied_keys=tied_lm_head("model.embed_tokens.weight"),
    validate=checked_by_options(llama_options),
)
