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

from trlax.models.layers import (
    Array,
    KVCache,
    activation,
    attention_bias,
    default_positions,
    dense,
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


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def rotary_inv_freq(config: Any) -> np.ndarray:
    """Inverse frequencies [rot_dim / 2] float32 of the rotated part of each head."""
    factor = rope_parameters(config).get("partial_rotary_factor", 1.0)  # v5's home of `rotary_pct`
    return inv_frequencies(config, head_dim(config), factor)


class GPTNeoXAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        proj = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": c.attention_bias,
                "std": c.initializer_range}
        self.query_key_value = dense(3 * c.hidden_size, "query_key_value", **proj)
        self.dense = dense(c.hidden_size, "dense", **proj)
        self.attention_dropout = nn.Dropout(c.attention_dropout)

    def __call__(
        self, x: Array, bias: Array, cos: Array, sin: Array, deterministic: bool, cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        d = head_dim(c)
        qkv = self.query_key_value(x).reshape(b, t, c.num_attention_heads, 3 * d)  # HF's per-head [q | k | v]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, nH, D]
        rot = cos.shape[-1]  # rotary dims; the rest of each head passes through unrotated
        q = jnp.concatenate([apply_rotary(q[..., :rot], cos, sin), q[..., rot:]], axis=-1)
        k = jnp.concatenate([apply_rotary(k[..., :rot], cos, sin), k[..., rot:]], axis=-1)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        out = dot_product_attention(q, k, v, bias, scale=d**-0.5, dropout=self.attention_dropout,
                                    deterministic=deterministic)
        return self.dense(out.reshape(b, t, c.hidden_size)), cache


class GPTNeoXMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        proj = {"dtype": self.dtype, "param_dtype": self.param_dtype, "std": c.initializer_range}
        self.dense_h_to_4h = dense(c.intermediate_size, "dense_h_to_4h", **proj)
        self.dense_4h_to_h = dense(c.hidden_size, "dense_4h_to_h", **proj)
        self.act = activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.post_attention_layernorm = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype,
                                                     param_dtype=self.param_dtype)
        self.post_attention_dropout = nn.Dropout(c.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(c.hidden_dropout)
        self.attention = GPTNeoXAttention(c, self.dtype, self.param_dtype)
        self.mlp = GPTNeoXMLP(c, self.dtype, self.param_dtype)

    def __call__(
        self, x: Array, bias: Array, cos: Array, sin: Array, deterministic: bool, cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        attn, cache = self.attention(self.input_layernorm(x), bias, cos, sin, deterministic, cache,
                                     cache_index)
        attn = self.post_attention_dropout(attn, deterministic=deterministic)
        if self.config.use_parallel_residual:  # both branches read the layer input
            mlp = self.mlp(self.post_attention_layernorm(x))
            return self.post_mlp_dropout(mlp, deterministic=deterministic) + attn + x, cache
        h = attn + x
        mlp = self.mlp(self.post_attention_layernorm(h))
        return self.post_mlp_dropout(mlp, deterministic=deterministic) + h, cache


class GPTNeoXModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.embed_in = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                 embedding_init=normal_init(c.initializer_range))
        self.emb_dropout = nn.Dropout(c.hidden_dropout)
        self.layers = make_stack(GPTNeoXLayer, c.num_hidden_layers, "layers", config=c, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        self.final_layer_norm = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

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
        x = self.emb_dropout(self.embed_in(input_ids), deterministic=deterministic)  # [B, T, H]
        cos, sin = rotary_cos_sin(position_ids, rotary_inv_freq(self.config))  # [B, T, rot_dim] float32
        bias = attention_bias(attention_mask, query_slots(input_ids.shape[1], cache_index))
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, layer in enumerate(self.layers.blocks):
            hidden.append(x)
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = layer(x, bias, cos, sin, deterministic, layer_cache, cache_index)
            new_cache.append(layer_cache)
        x = self.final_layer_norm(x)
        hidden.append(x)  # transformers replaces the last layer's output with the normed state
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class GPTNeoXForCausalLM(nn.Module):
    """GPT-NeoX with its LM head. Inputs and outputs: see `trlax.models.outputs.CausalLMOutput`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.gpt_neox = GPTNeoXModel(c, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:  # Pythia and NeoX-20B: an untied head, stored as `embed_out`
            self.embed_out = dense(c.vocab_size, "embed_out", self.dtype, self.param_dtype, use_bias=False,
                                   std=c.initializer_range)

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
        if position_ids is None:  # transformers' default: arange from the cache position, mask ignored
            position_ids = default_positions(input_ids, cache_index)
        h, hidden, cache = self.gpt_neox(
            input_ids, attention_mask, position_ids, deterministic, output_hidden_states, cache,
            jnp.asarray(cache_index, jnp.int32),
        )
        if self.config.tie_word_embeddings:
            logits = self.gpt_neox.embed_in.attend(h)
        else:
            logits = self.embed_out(h)
        return CausalLMOutput(logits=logits.astype(jnp.float32), last_hidden_state=h,
                              hidden_states=hidden, cache=cache)


def _validate(config: Any) -> None:
    rotary_inv_freq(config)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)  # raises for an activation trlax lacks


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    return [empty_kv_cache(batch, max_len, config.num_attention_heads, head_dim(config), dtype)
            for _ in range(config.num_hidden_layers)]


SPEC = ArchitectureSpec(
    model_types=("gpt_neox",),
    module=GPTNeoXForCausalLM,
    hf_architecture="GPTNeoXForCausalLM",
    num_layers=lambda c: c.num_hidden_layers,
    layer_pattern="gpt_neox.layers.{layer}",
    init_cache=_init_cache,
    # Buffers older checkpoints saved; transformers skips them on load too.
    ignored_keys=(r".*\.attention\.(bias|masked_bias)$", r".*\.rotary_emb\.inv_freq$"),
    tied_keys=lambda c: ("embed_out.weight",) if c.tie_word_embeddings else (),
    validate=_validate,
    lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
)
