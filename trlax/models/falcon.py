"""Falcon (`model_type` "falcon") in Flax Linen, with the PyTorch module names.

Param paths match transformers' FalconForCausalLM state dict (`transformer.word_embeddings`,
`transformer.h.{i}.self_attention.query_key_value`, `...self_attention.dense`,
`...mlp.dense_h_to_4h`, `...mlp.dense_4h_to_h`, the layer norms, `transformer.ln_f`,
`lm_head` when untied). One config class covers three layouts, all as transformers runs them:
- `new_decoder_architecture` (Falcon-40B/180B, Falcon 2): grouped KV heads, the fused
  projection laid out per KV group as [G query heads | k | v], a parallel block with two
  layer norms `ln_attn` / `ln_mlp` (or one `input_layernorm` if `num_ln_in_parallel_attn == 1`);
- `multi_query` (Falcon-7B): one KV head, the fused projection [all q heads | k | v], and
  with `parallel_attn` one `input_layernorm` feeding both branches;
- neither: per-head [q | k | v] blocks (as GPT-NeoX) with as many KV heads as query heads,
  and a sequential block (`input_layernorm`, `post_attention_layernorm`) unless `parallel_attn`.
Positions are rotary (HF rotate-half, `rope_parameters`) or, with `alibi=True`, ALiBi
from the attention mask, rounded to bfloat16 and divided by sqrt(head_dim) as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, alibi_attention_bias, alibi_slopes, attention_bias, split_heads_qkv
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.llama import validate_rope
from trlax.models.rope import attention_scaling, inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import SelfAttention
from trlax.models.spec import ArchitectureSpec, embedding_rules, feed_forward_rules, fused_attention_rules, tied_lm_head


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def num_kv_heads(config: Any) -> int:
    """KV heads the attention produces and the cache holds (1 for the multi-query layout)."""
    return config.num_kv_heads if config.new_decoder_architecture or not config.multi_query else 1


def num_layer_norms(config: Any) -> int:
    """Layer norms of a parallel block: 2 (ln_attn, ln_mlp) by default for the new architecture, else 1."""
    if config.num_ln_in_parallel_attn is not None:
        return config.num_ln_in_parallel_attn
    return 2 if config.new_decoder_architecture else 1


class FalconAttention(SelfAttention):
    out_proj_name = "dense"

    def setup(self) -> None:
        c = self.config
        self.query_key_value = self.linear((c.num_attention_heads + 2 * num_kv_heads(c)) * head_dim(c), c.bias)
        self.dense = self.linear(c.hidden_size, c.bias)
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def zero_unseen_queries(self) -> bool:
        return not self.config.alibi  # transformers hands SDPA an additive float mask with ALiBi: the eager result

    def head_counts(self) -> tuple[int, int, int]:
        return self.config.num_attention_heads, num_kv_heads(self.config), head_dim(self.config)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """The fused projection, laid out per config -> q [B, T, nH, D], k, v [B, T, nKV, D]."""
        c = self.config
        qkv = self.query_key_value(x)  # [B, T, (nH + 2 nKV) D]
        b, t, _ = qkv.shape
        nh, nkv, d = self.head_counts()
        if c.new_decoder_architecture:  # per KV group: its query heads, then its k and v
            grouped = qkv.reshape(b, t, nkv, nh // nkv + 2, d)
            return grouped[..., :-2, :].reshape(b, t, nh, d), grouped[..., -2, :], grouped[..., -1, :]
        if c.multi_query:  # every query head, then the one k and v
            heads = qkv.reshape(b, t, nh + 2, d)
            return heads[:, :, :nh], heads[:, :, nh:nh + 1], heads[:, :, nh + 1:]
        return split_heads_qkv(qkv, nh)  # per head [q | k | v]


class FalconDecoderLayer(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.self_attention = FalconAttention(c, self.dtype, self.param_dtype)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("dense_h_to_4h", "dense_4h_to_h"),
                               features=c.ffn_hidden_size, hidden_act=c.activation, use_bias=c.bias)
        eps = c.layer_norm_epsilon
        if not c.parallel_attn:
            self.post_attention_layernorm = self.layer_norm(eps)
            self.input_layernorm = self.layer_norm(eps)
        elif num_layer_norms(c) == 2:
            self.ln_attn = self.layer_norm(eps)
            self.ln_mlp = self.layer_norm(eps)
        else:
            self.input_layernorm = self.layer_norm(eps)
        self.attention_residual_dropout = nn.Dropout(c.attention_dropout)  # HF reuses attention_dropout here
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

    def __call__(self, x: Array, *, bias: Array, rotary: tuple[Array, Array] | None, deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        c = self.config
        residual = x
        two_norms = c.parallel_attn and num_layer_norms(c) == 2
        attn_in = self.ln_attn(x) if two_norms else self.input_layernorm(x)
        attn, cache = self.self_attention(attn_in, bias, rotary, deterministic, cache, cache_index)
        if c.parallel_attn:  # both branches read the layer input; their outputs are summed
            mlp = self.mlp(self.ln_mlp(x) if two_norms else attn_in) + attn
        else:
            residual = residual + self.attention_residual_dropout(attn, deterministic=deterministic)
            mlp = self.mlp(self.post_attention_layernorm(residual))
        return residual + self.hidden_dropout(mlp, deterministic=deterministic), cache


class FalconModel(DecoderBackbone):
    layout = BackboneLayout(embedding="word_embeddings", stack="h", final_norm="ln_f", norm_eps="layer_norm_epsilon")
    block_cls = FalconDecoderLayer

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        c = self.config
        if not c.alibi:
            return {"bias": attention_bias(attention_mask, q_slots),  # [B, 1, T, S]
                    "rotary": rotary_cos_sin(position_ids, inv_frequencies(c, head_dim(c)),
                                             scaling=attention_scaling(c))}
        # transformers: bfloat16 slopes times positions (a bfloat16 product), in the compute dtype, / sqrt(D).
        slopes = alibi_slopes(c.num_attention_heads).astype(jnp.bfloat16)
        return {"bias": alibi_attention_bias(attention_mask, q_slots, slopes, self.dtype, math.sqrt(head_dim(c))),
                "rotary": None}


class FalconForCausalLM(CausalLM):
    backbone_cls = FalconModel
    backbone_name = "transformer"


def _validate(config: Any) -> None:
    c = config
    if c.new_decoder_architecture and not c.parallel_attn:
        raise UnsupportedModelError("falcon: new_decoder_architecture=True with parallel_attn=False is not supported "
                                    "(transformers cannot run it either); use parallel_attn=True")
    if not c.new_decoder_architecture and c.parallel_attn and num_layer_norms(c) == 2:
        raise UnsupportedModelError("falcon: num_ln_in_parallel_attn=2 needs new_decoder_architecture=True "
                                    "(transformers cannot run it otherwise); use num_ln_in_parallel_attn=1 or None")
    nh, nkv = c.num_attention_heads, num_kv_heads(c)
    if not c.new_decoder_architecture and not c.multi_query and nkv != nh:
        raise UnsupportedModelError(f"falcon: num_kv_heads={nkv} != num_attention_heads={nh} needs "
                                    "new_decoder_architecture=True (the per-head [q|k|v] layout has one KV head "
                                    "per query head); fix num_kv_heads")
    if nh % nkv:
        raise UnsupportedModelError(f"falcon: num_attention_heads={nh} is not a multiple of num_kv_heads={nkv}")
    if not c.alibi:
        validate_rope(c)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(c.activation)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("falcon",), module=FalconForCausalLM, hf_architecture="FalconForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, num_kv_heads(c), head_dim(c)),
    sharding_rules=(*embedding_rules("word_embeddings"),
                    *fused_attention_rules("self_attention", "query_key_value", "dense"),  # layout per config
                    *feed_forward_rules("dense_h_to_4h", "dense_4h_to_h")),
    peft_targets=("query_key_value",),
    tied_keys=tied_lm_head("transformer.word_embeddings.weight"),
    validate=_validate,
    # ALiBi has no position table; transformers only limits rotary models by max_position_embeddings.
    max_positions=lambda c: None if c.alibi else c.max_position_embeddings,
)
