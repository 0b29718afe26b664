"""GPT-Neo (`model_type` "gpt_neo") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPTNeoForCausalLM state dict (`transformer.wte`,
`transformer.h.{i}.attn.attention.q_proj`, ...). What sets GPT-Neo apart from GPT-2:
- layers alternate between global and local attention (`config.attention_layers`, expanded
  from `attention_types`); a local layer sees only keys fewer than `window_size` cache
  slots behind the query (transformers' `tril(ones) ^ tril(ones, -window_size)` buffer);
- attention is NOT scaled by 1/sqrt(head_dim), and q/k/v are separate bias-free Linears.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
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
from trlax.models.spec import ArchitectureSpec

ATTENTION_TYPES = ("global", "local")


class GPTNeoSelfAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.head_dim = c.hidden_size // c.num_heads
        proj = {"dtype": self.dtype, "param_dtype": self.param_dtype, "std": c.initializer_range}
        # PyTorch's registration order (k, v, q): TRL's order-based sharing walks it.
        self.k_proj = dense(c.hidden_size, "k_proj", use_bias=False, **proj)
        self.v_proj = dense(c.hidden_size, "v_proj", use_bias=False, **proj)
        self.q_proj = dense(c.hidden_size, "q_proj", use_bias=False, **proj)
        self.out_proj = dense(c.hidden_size, "out_proj", use_bias=True, **proj)
        self.attn_dropout = nn.Dropout(float(c.attention_dropout))
        self.resid_dropout = nn.Dropout(float(c.resid_dropout))

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        heads = (b, t, c.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(heads)  # [B, T, nH, D]
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        # GPT-Neo never scales its attention scores (scale 1, not 1/sqrt(D)).
        out = dot_product_attention(q, k, v, bias, scale=1.0, dropout=self.attn_dropout,
                                    deterministic=deterministic)
        out = self.out_proj(out.reshape(b, t, c.hidden_size))
        return self.resid_dropout(out, deterministic=deterministic), cache


class GPTNeoAttention(nn.Module):
    """transformers' wrapper module; it only exists so param paths read `attn.attention.q_proj`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.attention = GPTNeoSelfAttention(self.config, self.dtype, self.param_dtype)

    def __call__(self, *args: Any) -> tuple[Array, KVCache | None]:
        return self.attention(*args)


class GPTNeoMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        inner = c.intermediate_size if c.intermediate_size is not None else 4 * c.hidden_size
        proj = {"dtype": self.dtype, "param_dtype": self.param_dtype, "std": c.initializer_range}
        self.c_fc = dense(inner, "c_fc", **proj)
        self.c_proj = dense(c.hidden_size, "c_proj", **proj)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(float(c.resid_dropout))

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))), deterministic=deterministic)


class GPTNeoBlock(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        eps = c.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.attn = GPTNeoAttention(c, self.dtype, self.param_dtype)
        self.ln_2 = nn.LayerNorm(eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp = GPTNeoMLP(c, self.dtype, self.param_dtype)

    def __call__(
        self, x: Array, biases: dict[str, Array], deterministic: bool, cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        bias = biases[self.config.attention_layers[self.layer_idx]]  # this layer's global or local mask
        attn_out, cache = self.attn(self.ln_1(x), bias, deterministic, cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x), deterministic)
        return x, cache


class GPTNeoModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        embed = {"dtype": self.dtype, "param_dtype": self.param_dtype,
                 "embedding_init": normal_init(c.initializer_range)}
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, **embed)
        self.wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, **embed)
        self.drop = nn.Dropout(float(c.embed_dropout))
        self.h = make_stack(GPTNeoBlock, c.num_layers, "h", config=c, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        self.ln_f = nn.LayerNorm(c.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)

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
        x = self.wte(input_ids) + self.wpe(position_ids)  # [B, T, H]
        x = self.drop(x, deterministic=deterministic)
        q_slots = query_slots(input_ids.shape[1], cache_index)
        # The window counts cache slots, not positions, as transformers' buffer does.
        biases = {"global": attention_bias(attention_mask, q_slots),
                  "local": attention_bias(attention_mask, q_slots, sliding_window=self.config.window_size)}
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.h.blocks):
            hidden.append(x)
            x, layer_cache = block(x, biases, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = self.ln_f(x)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class GPTNeoForCausalLM(nn.Module):
    """GPT-Neo with its LM head. Inputs and outputs: see `trlax.models.outputs.CausalLMOutput`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.transformer = GPTNeoModel(c, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, "lm_head", self.dtype, self.param_dtype, use_bias=False,
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
        h, hidden, cache = self.transformer(
            input_ids, attention_mask, position_ids, deterministic, output_hidden_states, cache,
            jnp.asarray(cache_index, jnp.int32),
        )
        if self.config.tie_word_embeddings:
            logits = self.transformer.wte.attend(h)
        else:
            logits = self.lm_head(h)
        return CausalLMOutput(logits=logits.astype(jnp.float32), last_hidden_state=h,
                              hidden_states=hidden, cache=cache)


def _validate(config: Any) -> None:
    unknown = sorted(set(config.attention_layers) - set(ATTENTION_TYPES))
    if unknown:
        raise UnsupportedModelError(
            f"GPT-Neo attention types {unknown} are not supported (config.attention_layers); "
            f"use only {list(ATTENTION_TYPES)}, as transformers does"
        )
    if config.hidden_size % config.num_heads:
        raise UnsupportedModelError(
            f"GPT-Neo hidden_size {config.hidden_size} is not a multiple of num_heads {config.num_heads}; "
            "transformers refuses this config too"
        )
    activation(config.activation_function)  # raises for an activation trlax lacks


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    # Local layers keep a full-length cache too: their window is a mask, so every layer shares one layout.
    head_dim = config.hidden_size // config.num_heads
    return [empty_kv_cache(batch, max_len, config.num_heads, head_dim, dtype)
            for _ in range(config.num_layers)]


SPEC = ArchitectureSpec(
    model_types=("gpt_neo",),
    module=GPTNeoForCausalLM,
    hf_architecture="GPTNeoForCausalLM",
    num_layers=lambda c: c.num_layers,
    layer_pattern="transformer.h.{layer}",
    init_cache=_init_cache,
    # Mask buffers that older checkpoints saved (transformers no longer persists them).
    ignored_keys=(r".*\.attn\.attention\.(bias|masked_bias)$",),
    tied_keys=lambda c: ("lm_head.weight",) if c.tie_word_embeddings else (),
    validate=_validate,
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
)
