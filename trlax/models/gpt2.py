"""GPT-2 (`model_type` "gpt2") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPT2LMHeadModel state dict: `transformer.wte`,
`transformer.wpe`, `transformer.h.{i}.attn.c_attn`, ..., `transformer.ln_f`. Conv1D
weights are stored as in PyTorch ([in, out]), so they load without a transpose. The LM
head is tied to `wte` unless `tie_word_embeddings` is False (then `lm_head.weight`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.models.layers import (
    Array,
    Dense,
    KVCache,
    activation,
    add_lora,
    attention_bias,
    default_positions,
    dot_product_attention,
    empty_kv_cache,
    make_stack,
    normal_init,
    query_slots,
    update_kv_cache,
)
from trlax.models.outputs import CausalLMOutput
from trlax.models.spec import ArchitectureSpec


class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = x @ kernel + bias with kernel [in, out] (PyTorch's layout)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", normal_init(self.std), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return add_lora(self, x, y)


class GPT2Attention(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.head_dim = c.n_embd // c.n_head
        self.c_attn = Conv1D(3 * c.n_embd, self.dtype, self.param_dtype, c.initializer_range)
        self.c_proj = Conv1D(c.n_embd, self.dtype, self.param_dtype, c.initializer_range)
        self.attn_dropout = nn.Dropout(c.attn_pdrop)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 x [B, T, H]
        q = q.reshape(b, t, c.n_head, self.head_dim)
        k = k.reshape(b, t, c.n_head, self.head_dim)
        v = v.reshape(b, t, c.n_head, self.head_dim)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        scale = 1.0
        if c.scale_attn_weights:
            scale /= self.head_dim**0.5
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        out = dot_product_attention(
            q, k, v, bias, scale=scale, dropout=self.attn_dropout, deterministic=deterministic
        )
        out = self.c_proj(out.reshape(b, t, c.n_embd))
        return self.resid_dropout(out, deterministic=deterministic), cache


class GPT2MLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        inner = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        self.c_fc = Conv1D(inner, self.dtype, self.param_dtype, c.initializer_range)
        self.c_proj = Conv1D(c.n_embd, self.dtype, self.param_dtype, c.initializer_range)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.resid_pdrop)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))), deterministic=deterministic)


class GPT2Block(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        eps = c.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.attn = GPT2Attention(c, self.layer_idx, self.dtype, self.param_dtype)
        self.ln_2 = nn.LayerNorm(eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp = GPT2MLP(c, self.dtype, self.param_dtype)

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        attn_out, cache = self.attn(self.ln_1(x), bias, deterministic, cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x), deterministic)
        return x, cache


class GPT2Model(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        init = normal_init(c.initializer_range)
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=init)
        self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
                            embedding_init=init)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = make_stack(GPT2Block, c.n_layer, "h", config=c, dtype=self.dtype, param_dtype=self.param_dtype)
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
        bias = attention_bias(attention_mask, query_slots(input_ids.shape[1], cache_index))
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.h.blocks):
            hidden.append(x)
            x, layer_cache = block(x, bias, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = self.ln_f(x)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head. Inputs and outputs: see `trlax.models.outputs.CausalLMOutput`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.transformer = GPT2Model(c, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=normal_init(c.initializer_range))

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
        if position_ids is None:  # transformers' default: arange from the cache position
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
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True is not supported by trlax; use a config without it.")


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    head_dim = config.n_embd // config.n_head
    return [empty_kv_cache(batch, max_len, config.n_head, head_dim, dtype) for _ in range(config.n_layer)]


SPEC = ArchitectureSpec(
    model_types=("gpt2",),
    module=GPT2LMHeadModel,
    hf_architecture="GPT2LMHeadModel",
    num_layers=lambda c: c.n_layer,
    layer_pattern="transformer.h.{layer}",
    init_cache=_init_cache,
    keep_layout=(r".*\.(c_attn|c_proj|c_fc)\.weight$",),
    ignored_keys=(r".*\.attn\.(bias|masked_bias)$",),
    tied_keys=lambda c: ("lm_head.weight",) if c.tie_word_embeddings else (),
    validate=_validate,
    lora_targets=("c_attn", "c_proj", "c_fc"),
    max_positions=lambda c: c.n_positions,
)
