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
import jax.numpy as jnp
import numpy as np

from trlax.models.attention import Array, attend, causal_masks
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.rope import apply_rotary, inv_frequencies, rope_parameters, rotary_cos_sin
from trlax.models.spec import ArchitectureSpec
from trlax.models.stack import layer_stack


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def rotary_inv_freq(config: Any) -> np.ndarray:
    """Inverse frequencies [rot_dim / 2] float32 of the rotated part of each head."""
    factor = rope_parameters(config).get("partial_rotary_factor", 1.0)  # v5's home of `rotary_pct`
    return inv_frequencies(config, head_dim(config), factor)


class GPTNeoXAttention(HFModule):
    def setup(self) -> None:
        c = self.config
        self.query_key_value = self.linear(3 * c.hidden_size, c.attention_bias)
        self.dense = self.linear(c.hidden_size, c.attention_bias)
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def __call__(
        self, x: Array, bias: Array, rotary: tuple[Array, Array], deterministic: bool, cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        d = head_dim(c)
        qkv = self.query_key_value(x).reshape(b, t, c.num_attention_heads, 3 * d)  # HF's per-head [q | k | v]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, nH, D]
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # the first rot_dim dims of each head
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=d**-0.5, dropout=self.attention_dropout,
                            deterministic=deterministic)
        return self.dense(out.reshape(b, t, c.hidden_size)), cache


class GPTNeoXMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.dense_h_to_4h = self.linear(c.intermediate_size)
        self.dense_4h_to_h = self.linear(c.hidden_size)
        self.act = activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = self.layer_norm(c.layer_norm_eps)
        self.post_attention_layernorm = self.layer_norm(c.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(c.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(c.hidden_dropout)
        self.attention = GPTNeoXAttention(c, self.dtype, self.param_dtype)
        self.mlp = GPTNeoXMLP(c, self.dtype, self.param_dtype)

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
    embedding_name = "embed_in"
    final_norm_name = "final_layer_norm"

    def setup(self) -> None:
        c = self.config
        self.embed_in = self.embedding(c.vocab_size, c.hidden_size)
        self.emb_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = layer_stack(GPTNeoXLayer, c.num_hidden_layers, "layers", config=c, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.final_layer_norm = self.layer_norm(c.layer_norm_eps)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.emb_dropout(self.embed_in(input_ids), deterministic=deterministic)  # [B, T, H]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        return {"masks": causal_masks(attention_mask, q_slots, [None]),
                "rotary": rotary_cos_sin(position_ids, rotary_inv_freq(self.config))}  # [B, T, rot_dim] float32


class GPTNeoXForCausalLM(CausalLM):
    backbone_cls = GPTNeoXModel
    backbone_name = "gpt_neox"
    head_name = "embed_out"  # Pythia and NeoX-20B: an untied head, stored as `embed_out`


def _validate(config: Any) -> None:
    rotary_inv_freq(config)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("gpt_neox",), module=GPTNeoXForCausalLM, hf_architecture="GPTNeoXForCausalLM",
    base_model_prefix="gpt_neox", layer_pattern="gpt_neox.layers.{layer}", num_layers=lambda c: c.num_hidden_layers,
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_attention_heads, head_dim(c)),
    sharding_rules=(
        (r"(^|/)embed_in/embedding$", ("vocab", "embed")),
        (r"(^|/)embed_out/kernel$", ("embed", "vocab")),
        (r"attention/query_key_value/kernel$", ("embed", "heads")),  # fused, per head [q|k|v]
        (r"attention/query_key_value/bias$", ("heads",)),
        (r"attention/dense/kernel$", ("heads", "embed")),
        (r"mlp/dense_h_to_4h/kernel$", ("embed", "mlp")),
        (r"mlp/dense_h_to_4h/bias$", ("mlp",)),
        (r"mlp/dense_4h_to_h/kernel$", ("mlp", "embed")),
    ),
    peft_targets=("query_key_value",),
    # Buffers older checkpoints saved; transformers skips them on load too.
    ignored_keys=(r".*\.attention\.(bias|masked_bias)$", r".*\.rotary_emb\.inv_freq$"),
    tied_keys=lambda c: ("embed_out.weight",) if c.tie_word_embeddings else (),
    validate=_validate,
)
