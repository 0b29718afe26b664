"""Cohere / Command-R (`model_type` "cohere") in Flax Linen, with the PyTorch module names.

Param paths match transformers' CohereForCausalLM state dict (`model.embed_tokens`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `...self_attn.{q,k}_norm`,
`...mlp.{gate,up,down}_proj`, `...input_layernorm`, `model.norm`, `lm_head` when untied).
What sets Cohere apart from Llama:
- a parallel block with one norm: x + attn(norm(x)) + mlp(norm(x));
- LayerNorm without a bias (mean-centred, in float32);
- interleaved rotary embeddings ("rotate every two"), applied in float32;
- `use_qk_norm`: a bias-free LayerNorm over each q/k head with one weight row per head
  (weight [heads, head_dim]), before the rotation;
- logits multiplied by `logit_scale`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.llama import LLAMA_SHARDING, ROTARY_BUFFERS, validate_rope
from trlax.models.rope import apply_rotary, attention_scaling, inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import SelfAttention, head_dim_of
from trlax.models.spec import ArchitectureSpec, tied_lm_head


class CohereAttention(SelfAttention):
    def setup(self) -> None:
        c = self.config
        d, bias = head_dim_of(c), c.attention_bias
        self.q_proj = self.linear(c.num_attention_heads * d, bias)
        self.k_proj = self.linear(c.num_key_value_heads * d, bias)
        self.v_proj = self.linear(c.num_key_value_heads * d, bias)
        self.o_proj = self.linear(c.hidden_size, bias)
        if c.use_qk_norm:  # weight [heads, head_dim]: each head its own row, normalised over head_dim
            self.q_norm = self.layer_norm(c.layer_norm_eps, use_bias=False, feature_axes=(-2, -1))
            self.k_norm = self.layer_norm(c.layer_norm_eps, use_bias=False, feature_axes=(-2, -1))
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        return (self.q_norm(q), self.k_norm(k)) if self.config.use_qk_norm else (q, k)

    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        """Interleaved RoPE in float32 with cos/sin rounded to x's dtype first, as CohereAttention does."""
        cos, sin = cos.astype(x.dtype).astype(jnp.float32), sin.astype(x.dtype).astype(jnp.float32)
        return apply_rotary(x.astype(jnp.float32), cos, sin, interleaved=True).astype(x.dtype)


class CohereMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.gate_proj = self.linear(c.intermediate_size, use_bias=False)
        self.up_proj = self.linear(c.intermediate_size, use_bias=False)
        self.down_proj = self.linear(c.hidden_size, use_bias=False)
        self.act = activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class CohereDecoderLayer(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.self_attn = CohereAttention(c, self.dtype, self.param_dtype, self.layer_idx)
        self.mlp = CohereMLP(c, self.dtype, self.param_dtype)
        self.input_layernorm = self.layer_norm(c.layer_norm_eps, use_bias=False)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.input_layernorm(x)  # one norm feeds both branches
        attn, cache = self.self_attn(h, masks[None], rotary, deterministic, cache, cache_index)
        return x + attn + self.mlp(h), cache


class CohereModel(DecoderBackbone):
    layout = BackboneLayout(embedding="embed_tokens", final_norm="norm", norm_bias=False, padding_idx=True)
    block_cls = CohereDecoderLayer

    def rotary(self, position_ids: Array) -> tuple[Array, Array]:
        """cos, sin [B, T, D] float32, each frequency twice."""
        return rotary_cos_sin(position_ids, inv_frequencies(self.config, head_dim_of(self.config)),
                              interleaved=True, scaling=attention_scaling(self.config))


class CohereForCausalLM(CausalLM):
    backbone_cls = CohereModel
    backbone_name = "model"

    def logits(self, h: Array) -> Array:
        logits = super().logits(h)  # [B, T, V] compute dtype
        return logits * jnp.asarray(self.config.logit_scale, logits.dtype)


def _validate(config: Any) -> None:
    if config.logit_scale is None:
        raise UnsupportedModelError("cohere: logit_scale=None is not supported (transformers multiplies the logits "
                                    "by it and fails too); set logit_scale, e.g. 1.0")
    validate_rope(config)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("cohere",), module=CohereForCausalLM, hf_architecture="CohereForCausalLM",
    base_model_prefix="model", layer_pattern="model.layers.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_key_value_heads, head_dim_of(c)),
    sharding_rules=LLAMA_SHARDING,
    peft_targets=(),  # PEFT has no default target_modules for cohere: users must name them
    ignored_keys=ROTARY_BUFFERS,
    tied_keys=tied_lm_head("model.embed_tokens.weight"),
    validate=_validate,
)
