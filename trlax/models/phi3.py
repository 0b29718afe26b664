"""Phi-3 / Phi-3.5 / Phi-4-mini (`model_type` phi3): the Llama modules with fused projections.

What differs from Llama, all as transformers' Phi3ForCausalLM computes it:
- one fused `qkv_proj` (no bias) whose output is [q heads | k heads | v heads], split at
  run time, so the kernel keeps transformers' layout and conversion stays a transpose;
- one fused `gate_up_proj` whose output is [gate | up]: down(up * act(gate));
- RoPE on the first `partial_rotary_factor` of each head (Phi-4-mini: 0.75);
- dropout on the attention and MLP outputs (`resid_pdrop`), a sliding window on every
  layer when `sliding_window` is set (Mistral's rule);
- RoPE "default" or "longrope" (also spelled "su" or "yarn" in Phi-3 configs, which
  transformers maps to "longrope": Phi-3-*-128k, Phi-3.5, Phi-4-mini; see `trlax.models.rope`).
Param paths are transformers': `model.layers.{i}.self_attn.{qkv_proj,o_proj}`,
`model.layers.{i}.mlp.{gate_up_proj,down_proj}`, the RMSNorms as Llama's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.models.attention import Array
from trlax.models.layers import HFModule, activation
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.llama import (
    DecoderOptions,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    decoder_options,
    sliding_everywhere,
)
from trlax.models.rope import partial_inv_frequencies, rope_parameters
from trlax.models.self_attention import head_dim_of
from trlax.models.spec import ParamRule, embedding_rules, feed_forward_rules, fused_attention_rules


def phi3_options(config: Any) -> DecoderOptions:
    """DecoderOptions of a phi3 config (no biases, partial rotary, residual dropout)."""
    return decoder_options(config, qkv_bias=False, o_bias=False, mlp_bias=False, resid_dropout=config.resid_pdrop,
                           partial_rotary_factor=rope_parameters(config).get("partial_rotary_factor", 1.0),
                           **sliding_everywhere(config))


class Phi3Attention(LlamaAttention):
    """Llama's attention reading q, k, v from one fused `qkv_proj` ([q | k | v] along the output)."""

    def setup(self) -> None:
        c, o = self.config, self.options
        # PyTorch registers o_proj first: the order TRL's layer-sharing rule walks.
        self.o_proj = self.linear(c.hidden_size, use_bias=False)
        self.qkv_proj = self.linear((c.num_attention_heads + 2 * c.num_key_value_heads) * o.head_dim, use_bias=False)
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        c, o = self.config, self.options
        b, t, _ = x.shape
        q_size, kv_size = c.num_attention_heads * o.head_dim, c.num_key_value_heads * o.head_dim
        qkv = self.qkv_proj(x)  # [B, T, (Hq + 2 Hkv) D]
        q = qkv[..., :q_size].reshape(b, t, c.num_attention_heads, o.head_dim)
        k = qkv[..., q_size:q_size + kv_size].reshape(b, t, c.num_key_value_heads, o.head_dim)
        v = qkv[..., q_size + kv_size:].reshape(b, t, c.num_key_value_heads, o.head_dim)
        return q, k, v


class Phi3MLP(HFModule, kw_only=True):
    """down(up * act(gate)) with [gate | up] from one fused `gate_up_proj`."""

    options: DecoderOptions

    def setup(self) -> None:
        c = self.config
        self.gate_up_proj = self.linear(2 * c.intermediate_size, use_bias=False)
        self.down_proj = self.linear(c.hidden_size, use_bias=False)
        self.act = activation(self.options.hidden_act)

    def __call__(self, x: Array) -> Array:
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)  # [B, T, I] each
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Phi3Attention

    def make_mlp(self) -> nn.Module:
        return Phi3MLP(config=self.config, options=self.options, dtype=self.dtype, param_dtype=self.param_dtype)


class Phi3Model(LlamaModel):
    make_options = staticmethod(phi3_options)
    layer_cls_for = staticmethod(lambda config: Phi3DecoderLayer)


class Phi3ForCausalLM(LlamaForCausalLM):
    backbone_cls = Phi3Model


def _validate(config: Any) -> None:
    partial_inv_frequencies(config, head_dim_of(config))
    activation(config.hidden_act)
    phi3_options(config)


PHI3_SHARDING: tuple[ParamRule, ...] = (
    *embedding_rules("embed_tokens"),
    *fused_attention_rules("self_attn", "qkv_proj", "o_proj", biases=False),  # [q | k | v]
    *feed_forward_rules("gate_up_proj", "down_proj", biases=False),  # fused [gate | up]
)

SPEC = dataclasses.replace(
    LLAMA_SPEC, model_types=("phi3",), module=Phi3ForCausalLM, hf_architecture="Phi3ForCausalLM",
    sharding_rules=PHI3_SHARDING, peft_targets=(),  # PEFT has no default target_modules for phi3
    validate=_validate, rebuilds_longrope_cache=True,
)
