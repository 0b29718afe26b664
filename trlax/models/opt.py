"""OPT (`model_type` "opt") in Flax Linen, with the PyTorch module names.

Param paths match transformers' OPTForCausalLM state dict (`model.decoder.embed_tokens`,
`model.decoder.layers.{i}.self_attn.q_proj`, ...). What sets OPT apart:
- learned positions with an offset of 2, derived from the attention mask (a left-padded
  row starts at position 0 at its first real token; pads sit at -1, i.e. row 1);
- `do_layer_norm_before=False` (OPT-350m) puts the layer norms after each residual add and
  drops the decoder's final layer norm (as does `_remove_final_layer_norm`);
- `word_embed_proj_dim != hidden_size` adds `project_in` / `project_out`: the token
  embeddings and the LM head live in the smaller space, so the head (and TRL's value head)
  read the state after `project_out`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.layers import (
    Array,
    KVCache,
    activation,
    attention_bias,
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

POSITION_OFFSET = 2  # OPT's learned position table has 2 extra leading rows (a fairseq legacy)


def default_position_ids(attention_mask: Array, seq_len: int, cache_index: Array) -> Array:
    """transformers' OPT positions when position_ids=None: [B, T] int32.

    `cumsum(mask) * mask - 1` over all S mask slots (pads get -1), then the T slots from
    `cache_index` on: the same as HF slicing `[:, past_seen_tokens:]` of its [B, past + T] mask.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=1) * mask - 1  # [B, S]
    return jax.lax.dynamic_slice_in_dim(positions, cache_index, seq_len, axis=1)  # [B, T]


def _layer_norm(config: Any, dtype: Any, param_dtype: Any, name: str | None = None) -> nn.LayerNorm:
    affine = config.layer_norm_elementwise_affine
    # torch.nn.LayerNorm's default eps (OPT does not configure it); flax's default is 1e-6.
    return nn.LayerNorm(1e-5, dtype=dtype, param_dtype=param_dtype, use_bias=affine, use_scale=affine,
                        name=name)


def _dense_kwargs(module: nn.Module, use_bias: bool) -> dict[str, Any]:
    return {"dtype": module.dtype, "param_dtype": module.param_dtype, "use_bias": use_bias,
            "std": module.config.init_std}


class OPTAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.head_dim = c.hidden_size // c.num_attention_heads
        proj = _dense_kwargs(self, c.enable_bias)
        # PyTorch's registration order (k, v, q): TRL's order-based sharing walks it.
        self.k_proj = dense(c.hidden_size, "k_proj", **proj)
        self.v_proj = dense(c.hidden_size, "v_proj", **proj)
        self.q_proj = dense(c.hidden_size, "q_proj", **proj)
        self.out_proj = dense(c.hidden_size, "out_proj", **proj)
        self.attn_dropout = nn.Dropout(c.attention_dropout)

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        heads = (b, t, c.num_attention_heads, self.head_dim)
        # OPT scales q right after its projection and attends with scale 1 (kept for bit-parity).
        q = (self.q_proj(x) * self.head_dim**-0.5).reshape(heads)  # [B, T, nH, D]
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        out = dot_product_attention(q, k, v, bias, scale=1.0, dropout=self.attn_dropout,
                                    deterministic=deterministic)
        return self.out_proj(out.reshape(b, t, c.hidden_size)), cache


class OPTDecoderLayer(nn.Module):
    config: Any
    layer_idx: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        proj = _dense_kwargs(self, c.enable_bias)
        self.self_attn = OPTAttention(c, self.dtype, self.param_dtype)
        self.self_attn_layer_norm = _layer_norm(c, self.dtype, self.param_dtype)
        self.fc1 = dense(c.ffn_dim, "fc1", **proj)
        self.fc2 = dense(c.hidden_size, "fc2", **proj)
        self.final_layer_norm = _layer_norm(c, self.dtype, self.param_dtype)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.dropout)

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        pre_ln = self.config.do_layer_norm_before  # False for OPT-350m: norms after the residual adds
        h = self.self_attn_layer_norm(x) if pre_ln else x
        h, cache = self.self_attn(h, bias, deterministic, cache, cache_index)
        x = x + self.dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre_ln else x
        h = self.dropout(self.fc2(self.act(self.fc1(h))), deterministic=deterministic)
        x = x + h
        if not pre_ln:
            x = self.final_layer_norm(x)
        return x, cache


class OPTDecoder(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        init = normal_init(c.init_std)
        embed = {"dtype": self.dtype, "param_dtype": self.param_dtype, "embedding_init": init}
        self.embed_tokens = nn.Embed(c.vocab_size, c.word_embed_proj_dim, **embed)
        self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, **embed)
        if c.word_embed_proj_dim != c.hidden_size:
            proj = _dense_kwargs(self, use_bias=False)
            self.project_out = dense(c.word_embed_proj_dim, "project_out", **proj)  # PyTorch's order
            self.project_in = dense(c.hidden_size, "project_in", **proj)
        if c.do_layer_norm_before and not c._remove_final_layer_norm:
            self.final_layer_norm = _layer_norm(c, self.dtype, self.param_dtype)
        self.layers = make_stack(OPTDecoderLayer, c.num_hidden_layers, "layers", config=c, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

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
        c = self.config
        x = self.embed_tokens(input_ids)  # [B, T, Wp]
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_in(x)  # [B, T, H]
        # transformers' OPT applies no dropout to the embeddings.
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        bias = attention_bias(attention_mask, query_slots(input_ids.shape[1], cache_index))
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, layer in enumerate(self.layers.blocks):
            hidden.append(x)
            x, layer_cache = layer(x, bias, deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        if c.do_layer_norm_before and not c._remove_final_layer_norm:
            x = self.final_layer_norm(x)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_out(x)  # [B, T, Wp]
        hidden.append(x)  # transformers replaces the last layer's output with the decoder's output
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class OPTModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.decoder = OPTDecoder(self.config, self.dtype, self.param_dtype)

    def __call__(self, *args: Any) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        return self.decoder(*args)


class OPTForCausalLM(nn.Module):
    """OPT with its LM head. Inputs and outputs: see `trlax.models.outputs.CausalLMOutput`."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.model = OPTModel(c, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, "lm_head", self.dtype, self.param_dtype, use_bias=False,
                                 std=c.init_std)

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
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if position_ids is None:  # transformers' OPT default: count real tokens in the mask
            position_ids = default_position_ids(attention_mask, input_ids.shape[1], cache_index)
        h, hidden, cache = self.model(input_ids, attention_mask, position_ids, deterministic,
                                      output_hidden_states, cache, cache_index)
        if self.config.tie_word_embeddings:
            logits = self.model.decoder.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return CausalLMOutput(logits=logits.astype(jnp.float32), last_hidden_state=h,
                              hidden_states=hidden, cache=cache)


def _validate(config: Any) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedModelError(
            f"OPT hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{config.num_attention_heads}; transformers refuses this config too"
        )
    if config.layerdrop:
        raise UnsupportedModelError(
            f"OPT layerdrop={config.layerdrop} (randomly skipping layers in training) is not supported "
            "by trlax; set config.layerdrop = 0.0"
        )
    activation(config.activation_function)  # raises for an activation trlax lacks


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    head_dim = config.hidden_size // config.num_attention_heads
    return [empty_kv_cache(batch, max_len, config.num_attention_heads, head_dim, dtype)
            for _ in range(config.num_hidden_layers)]


SPEC = ArchitectureSpec(
    model_types=("opt",),
    module=OPTForCausalLM,
    hf_architecture="OPTForCausalLM",
    num_layers=lambda c: c.num_hidden_layers,
    layer_pattern="model.decoder.layers.{layer}",
    init_cache=_init_cache,
    tied_keys=lambda c: ("lm_head.weight",) if c.tie_word_embeddings else (),
    validate=_validate,
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
)
