"""OLMo 2 and OLMo 3 (`model_type` olmo2, olmo3): the Llama modules with AllenAI's norm placement.

What differs from Llama, all as transformers' Olmo2ForCausalLM / Olmo3ForCausalLM compute it:
- no norm before the sublayers; each sublayer's output is normalised before the residual add:
  h = x + post_attention_layernorm(attn(x)), then h + post_feedforward_layernorm(mlp(h));
- `q_norm` / `k_norm`: RMSNorms over the whole q and k projections (weights [Hq * D] and
  [Hkv * D], one statistic across all heads of a token), before splitting into heads and RoPE;
- every RMSNorm multiplies its weight in float32 and casts afterwards (Llama casts first), and
  RoPE rotates in float32 with float32 cos/sin, cast back to the compute dtype afterwards;
- `attention_bias` on all four projections (o_proj too); the MLP never has biases.
OLMo 3 adds sliding-window layers per `layer_types` (`sliding_window`; every fourth layer full
by default) with RoPE parameters per layer type (`rope_parameters` holds one dict per type).
Param paths are transformers': `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`...self_attn.{q,k}_norm`, `...mlp.{gate,up,down}_proj`,
`...{post_attention,post_feedforward}_layernorm`, `model.norm`, `lm_head` when untied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.layers import HFModule, activation
from trlax.models.llama import (
    LAYER_TYPES,
    DecoderOptions,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    PerLayerTypeRope,
    configured_options,
    layer_type_of,
    validate_rope,
    without_sliding,
)
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.rope import apply_rotary


def olmo2_options(config: Any) -> DecoderOptions:
    """DecoderOptions of an olmo2 or olmo3 config (as their HF modules build them)."""
    if config.model_type == "olmo3":
        return configured_options(config, mlp_bias=False)
    if config.model_type == "olmo2":  # full attention everywhere: Olmo2Model builds no sliding mask
        return configured_options(config, mlp_bias=False, **without_sliding(config))
    raise UnsupportedModelError(f"model_type {config.model_type!r} is not an OLMo 2 / OLMo 3 model")


def olmo_norm(module: HFModule, options: DecoderOptions) -> nn.Module:
    """OLMo's RMSNorm: the weight multiply in float32, then the cast to the compute dtype."""
    return module.rms_norm(module.config.rms_norm_eps, float32_weight=True)


class Olmo2Attention(LlamaAttention):
    """Llama's attention with q/k RMSNorms over the whole projections (all heads at once)."""

    def setup(self) -> None:
        super().setup()  # the projections and attention_dropout (options.qk_norm is off: no per-head norms)
        self.q_norm = olmo_norm(self, self.options)  # weight [Hq * D]
        self.k_norm = olmo_norm(self, self.options)  # weight [Hkv * D]

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, T, H] -> q [B, T, Hq, D], k and v [B, T, Hkv, D]; q and k normalised before the split."""
        b, t, _ = x.shape
        hq, hkv, d = self.head_counts()
        q = self.q_norm(self.q_proj(x))  # [B, T, Hq * D]: one RMS over every head of a token
        k = self.k_norm(self.k_proj(x))  # [B, T, Hkv * D]
        return q.reshape(b, t, hq, d), k.reshape(b, t, hkv, d), self.v_proj(x).reshape(b, t, hkv, d)

    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        """RoPE in float32 (OLMo's cos/sin stay float32 and promote q/k), cast back to x's dtype."""
        return apply_rotary(x.astype(jnp.float32), cos, sin).astype(x.dtype)


class Olmo2DecoderLayer(LlamaDecoderLayer):
    """Post-sublayer norms: x + norm(attn(x)), then x + norm(mlp(x)); no input norm, no residual dropout."""

    attention_cls = Olmo2Attention
    make_norm = staticmethod(olmo_norm)

    def setup(self) -> None:
        kw = {"config": self.config, "options": self.options, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.self_attn = self.attention_cls(**kw, layer_idx=self.layer_idx)
        self.mlp = self.make_mlp()
        self.post_attention_layernorm = self.make_norm(self, self.options)
        self.post_feedforward_layernorm = self.make_norm(self, self.options)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: dict[str, tuple[Array, Array]],
                 deterministic: bool, cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        layer_rotary = rotary[layer_type_of(self.options, self.layer_idx)]  # this layer type's table
        attn_out, cache = self.attention(x, masks, layer_rotary, deterministic, cache, cache_index)
        x = x + self.post_attention_layernorm(attn_out)
        return x + self.post_feedforward_layernorm(self.mlp(x)), cache


class Olmo2Model(PerLayerTypeRope, LlamaModel):
    """One RoPE table per layer type present (OLMo 2: "full_attention" only, from its flat `rope_parameters`)."""

    make_options = staticmethod(olmo2_options)
    layer_cls_for = staticmethod(lambda config: Olmo2DecoderLayer)
    make_norm = staticmethod(olmo_norm)


class Olmo2ForCausalLM(LlamaForCausalLM):
    backbone_cls = Olmo2Model


def _validate(config: Any) -> None:
    options = olmo2_options(config)  # refuses bidirectional configs, unknown layer types, a missing window
    activation(config.hidden_act)  # raises for an activation trlax lacks
    for sliding in set(options.sliding):  # refuses RoPE settings trlax lacks, per layer type present
        validate_rope(config, LAYER_TYPES[sliding])


SPEC = dataclasses.replace(
    LLAMA_SPEC, model_types=("olmo2", "olmo3"), module=Olmo2ForCausalLM, hf_architecture="Olmo2ForCausalLM",
    peft_targets=(),  # PEFT has no default target_modules for olmo2 / olmo3
    validate=_validate,
)
