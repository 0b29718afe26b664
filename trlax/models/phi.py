"""Phi-1 / Phi-1.5 / Phi-2 (`model_type` phi) in Flax Linen, with transformers' module names.

Param paths match PhiForCausalLM: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v}_proj`,
`model.layers.{i}.self_attn.dense`, `model.layers.{i}.mlp.{fc1,fc2}`,
`model.layers.{i}.input_layernorm`, `model.final_layernorm`, `lm_head` (weight and bias).
What sets Phi apart:
- a parallel block with one LayerNorm: x + attn(ln(x)) + mlp(ln(x));
- partial rotary embeddings: the first `partial_rotary_factor` (0.5 by default) of each head;
- biased projections and a biased LM head;
- optional LayerNorms over each q/k head before RoPE (`qk_layernorm`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.llama import ROTARY_BUFFERS
from trlax.models.rope import attention_scaling, partial_inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import SelfAttention, head_dim_of
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules, tied_lm_head


class PhiAttention(SelfAttention):
    out_proj_name = "dense"

    def setup(self) -> None:
        c = self.config
        d = head_dim_of(c)
        self.q_proj = self.linear(c.num_attention_heads * d)
        self.k_proj = self.linear(c.num_key_value_heads * d)
        self.v_proj = self.linear(c.num_key_value_heads * d)
        self.dense = self.linear(c.hidden_size)
        if c.qk_layernorm:  # over hidden_size // num_attention_heads, as transformers builds them
            self.q_layernorm = self.layer_norm(c.layer_norm_eps)
            self.k_layernorm = self.layer_norm(c.layer_norm_eps)
        self.attention_dropout = nn.Dropout(c.attention_dropout or 0.0)

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        return (self.q_layernorm(q), self.k_layernorm(k)) if self.config.qk_layernorm else (q, k)


class PhiDecoderLayer(HFModule):
    """Parallel block: x + dropout(attn(ln(x))) + dropout(mlp(ln(x)))."""

    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.self_attn = PhiAttention(c, self.dtype, self.param_dtype, self.layer_idx)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("fc1", "fc2"), features=c.intermediate_size,
                               hidden_act=c.hidden_act)
        self.input_layernorm = self.layer_norm(c.layer_norm_eps)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.input_layernorm(x)
        attn, cache = self.self_attn(h, masks[None], rotary, deterministic, cache, cache_index)
        mlp = self.mlp(h)
        return (self.resid_dropout(attn, deterministic=deterministic)
                + self.resid_dropout(mlp, deterministic=deterministic) + x), cache


class PhiModel(DecoderBackbone):
    layout = BackboneLayout(embedding="embed_tokens", final_norm="final_layernorm", embedding_dropout="embd_pdrop",
                            padding_idx=True)
    block_cls = PhiDecoderLayer

    def rotary(self, position_ids: Array) -> tuple[Array, Array]:
        """cos, sin [B, T, rot_dim] float32."""
        return rotary_cos_sin(position_ids, partial_inv_frequencies(self.config, head_dim_of(self.config)),
                              scaling=attention_scaling(self.config))


class PhiForCausalLM(CausalLM):
    backbone_cls = PhiModel
    backbone_name = "model"
    head_bias = True


def _validate(config: Any) -> None:
    partial_inv_frequencies(config, head_dim_of(config))  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)


SPEC = ArchitectureSpec(
    model_types=("phi",), module=PhiForCausalLM, hf_architecture="PhiForCausalLM", base_model_prefix="model",
    layer_pattern="model.layers.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_key_value_heads, head_dim_of(c)),
    sharding_rules=(*embedding_rules("embed_tokens"),
                    *attention_rules("self_attn", "q_proj", "[kv]_proj", "dense", kv_axis="kv_heads"),
                    *feed_forward_rules("fc1", "fc2")),
    peft_targets=("q_proj", "v_proj", "fc1", "fc2"),
    ignored_keys=ROTARY_BUFFERS,
    tied_keys=tied_lm_head("model.embed_tokens.weight"),  # the head's bias stays its own tensor
    validate=_validate,
)
