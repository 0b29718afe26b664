"""GPT-NeoX / Pythia (`model_type` "gpt_neox") in Flax Linen, with the PyTorch module names.

Param paths match the checkpoints transformers writes for GPTNeoXForCausalLM
(`gpt_neox.embed_in`, `gpt_neox.layers.{i}.attention.query_key_value`, ..., `embed_out`:
transformers v5 renames the head to `lm_head` in memory but reads and writes `embed_out`).
What sets GPT-NeoX apart:
- one fused `query_key_value` projection laid out per head as [nH, 3, D] (q, k, v of head 0,
  then of head 1, ...); the kernel keeps that layout and is split at run time, so
  conversion stays a plain transpose;
- partial rotary embeddings: only the first `partial_rotary_factor * head_dim` dims of each
  q/k head rotate (v5 keeps the old `rotary_pct` in `rope_parameters`);
- `use_parallel_residual`: x + attn(ln1(x)) + mlp(ln2(x)) instead of the sequential block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, split_heads_qkv
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.rope import attention_scaling, partial_inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import SelfAttention
from trlax.models.spec import ArchitectureSpec, embedding_rules, feed_forward_rules, fused_attention_rules


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def rotary_inv_freq(config: Any) -> np.ndarray:
    """Inverse frequencies [rot_dim / 2] float32 of the rotated part of each head."""
    return partial_inv_frequencies(config, head_dim(config))


class GPTNeoXAttention(SelfAttention):
    out_proj_name = "dense"

    def setup(self) -> None:
        c = self.config
        self.query_key_value = self.linear(3 * c.hidden_size, c.attention_bias)
        self.dense = self.linear(c.hidden_size, c.attention_bias)
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def head_counts(self) -> tuple[int, int, int]:
        return self.config.num_attention_heads, self.config.num_attention_heads, head_dim(self.config)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        return split_heads_qkv(self.query_key_value(x), self.config.num_attention_heads)  # HF's per-head [q|k|v]


class GPTNeoXLayer(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = self.layer_norm(c.layer_norm_eps)
        self.post_attention_layernorm = self.layer_norm(c.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(c.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(c.hidden_dropout)
        self.attention = GPTNeoXAttention(c, self.dtype, self.param_dtype)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("dense_h_to_4h", "dense_4h_to_h"),
                               features=c.intermediate_size, hidden_act=c.hidden_act)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        attn, cache = self.attention(self.input_layernorm(x), masks[None], rotary, deterministic, cache, cache_index)
        attn = self.post_attention_dropout(attn, deterministic=deterministic)
        if self.config.use_parallel_residual:  # both branches read the layer input
            mlp = self.mlp(self.post_attention_layernorm(x))
            return self.post_mlp_dropout(mlp, deterministic=deterministic) + attn + x, cache
        h = attn + x
        mlp = self.mlp(self.post_attention_layernorm(h))
        return self.post_mlp_dropout(mlp, deterministic=deterministic) + h, cache


class GPTNeoXModel(DecoderBackbone):
    layout = BackboneLayout(embedding="embed_in", final_norm="final_layer_norm", embedding_dropout="hidden_dropout")
    block_cls = GPTNeoXLayer

    def rotary(self, position_ids: Array) -> tuple[Array, Array]:
        """cos, sin [B, T, rot_dim] float32."""
        return rotary_cos_sin(position_ids, rotary_inv_freq(self.config), scaling=attention_scaling(self.config))


class GPTNeoXForCausalLM(CausalLM):
    backbone_cls = GPTNeoXModel
    backbone_name = "gpt_neox"
    head_name = "embed_out"  # Pythia and NeoX-20B: an untied head, stored as `embed_out`


def _validate(config: Any) -> None:
    rotary_inv_freq(config)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)  # raises for an activation trlax lacks
    # GPTNeoXConfig has no head_dim; transformers would size the rotary frequencies from a stray one while its
    # attention uses hidden_size // num_attention_heads.
    if getattr(config, "head_dim", None) not in (None, head_dim(config)):
        raise UnsupportedModelError(
            f"gpt_neox config has head_dim={config.head_dim}, but GPT-NeoX heads are hidden_size // "
            f"num_attention_heads = {head_dim(config)}; remove head_dim from config.json")


SPEC = ArchitectureSpec(
    model_types=("gpt_neox",), module=GPTNeoXForCausalLM, hf_architecture="GPTNeoXForCausalLM",
    base_model_prefix="gpt_neox", layer_pattern="gpt_neox.layers.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_attention_heads, head_dim(c)),
    sharding_rules=(*embedding_rules("embed_in"), (r"(^|/)embed_out/kernel$", ("embed", "vocab")),
                    *fused_attention_rules("attention", "query_key_value", "dense"),  # fused, per head [q|k|v]
                    *feed_forward_rules("dense_h_to_4h", "dense_4h_to_h")),
    peft_targets=("query_key_value",), peft_module_names=(("embed_out", "lm_head"),),
    # Buffers older checkpoints saved; transformers skips them on load too.
    ignored_keys=(r".*\.attention\.(bias|masked_bias)$", r".*\.rotary_emb\.inv_freq$"),
    tied_keys=lambda c: {"embed_out.weight": "gpt_neox.embed_in.weight"} if c.tie_word_embeddings else {},
    validate=_validate,
)
