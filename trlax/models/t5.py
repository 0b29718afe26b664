"""T5 and mT5 (`model_type` t5, mt5) in Flax Linen, with the PyTorch module names.

Param paths match transformers' `T5ForConditionalGeneration` state dict: `shared`,
`encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}` (block 0 also
`relative_attention_bias`), `encoder.block.{i}.layer.1.DenseReluDense.{wi | wi_0, wi_1, wo}`,
`...layer_norm`, `encoder.final_layer_norm`; decoder blocks add
`layer.1.EncDecAttention` and move the feed-forward to `layer.2`. The encoder's and
decoder's `embed_tokens` are `shared` (tied keys: ignored on load, not written on save).

The LM head, as transformers v5 decides it:
- original T5 (config.json without `tie_word_embeddings: false`, i.e.
  `scale_decoder_outputs`): the head is `shared`, applied to the decoder output times
  d_model**-0.5 (`lm_head.weight` is a tied key);
- T5 v1.1 / Flan-T5 (`tie_word_embeddings: false`) and mT5: an own `lm_head`, no scaling.
  transformers v5 ties it to `shared` when a checkpoint has no `lm_head.weight` (a model
  built with `from_config`); trlax then loads `lm_head` as a copy of `shared.weight`, and
  always writes `lm_head.weight`, which transformers ties back when it equals `shared`.
  Trained in trlax, the two are updated separately.
`last_hidden_state` (what TRL's value head reads) is the decoder output after the final
norm and dropout, before that scaling: transformers' `decoder_hidden_states[-1]`.

Relative position buckets follow HF's float32 formula, evaluated in numpy at trace time,
so every backend gets the same buckets as PyTorch. Positions are cache slots (HF counts
positions from 0 regardless of padding), bidirectional in the encoder, causal in the
decoder; only block 0 of each stack owns the bias table, the other blocks reuse it.

Reference models (TRL's num_shared_layers): TRL has no T5 layer pattern; trlax uses
`decoder.block.{layer}`. TRL's rule shares everything that precedes the matching param in
named_parameters order, so for T5 "layer N" counts decoder blocks: the shared embedding,
the whole encoder and the first N decoder blocks are shared.

Not implemented (refused at load): umT5 (a bias table in every block), activations
trlax does not know. Cross-attention keys/values are recomputed from the encoder state on
each `decode` call; the KV cache holds decoder self-attention only.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from trlax.errors import UnsupportedModelError
from trlax.models.layers import (
    ACTIVATIONS,
    Array,
    KVCache,
    RMSNorm,
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
from trlax.models.outputs import Seq2SeqLMOutput
from trlax.models.seq2seq import Seq2SeqSpec


def tied_lm_head(config: Any) -> bool:
    """Original T5: the LM head is `shared` with d_model**-0.5 scaling (see the module doc)."""
    return config.model_type == "t5" and bool(config.scale_decoder_outputs)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(num_keys: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """HF's `_relative_position_bucket` for relative positions -(S-1)..S-1: [2S - 1] int32.

    Entry `r + S - 1` is the bucket of relative position r = key - query. Computed in
    float32 numpy exactly as PyTorch does, once per shape.
    """
    rel = np.arange(-(num_keys - 1), num_keys, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    # Logarithmic buckets up to max_distance; np.maximum only dodges log(0), whose row
    # takes the exact branch anyway.
    scaled = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
    """T5 attention: unscaled scores plus a relative position bias (none in cross-attention)."""

    config: Any
    is_decoder: bool
    has_relative_attention_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        f = c.initializer_factor
        inner = c.num_heads * c.d_kv
        make = functools.partial(dense, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        self.q = make(inner, "q", std=f * (c.d_model * c.d_kv) ** -0.5)
        self.k = make(inner, "k", std=f * c.d_model**-0.5)
        self.v = make(inner, "v", std=f * c.d_model**-0.5)
        self.o = make(c.d_model, "o", std=f * inner**-0.5)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embed(
                c.relative_attention_num_buckets, c.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=normal_init(f * c.d_model**-0.5))
        self.dropout = nn.Dropout(c.dropout_rate)

    def compute_bias(self, q_slots: Array, num_keys: int) -> Array:
        """Relative position bias [1, nH, T, S] for queries in `q_slots` [T] and keys in slots 0..S-1."""
        c = self.config
        table = jnp.asarray(relative_position_buckets(num_keys, not self.is_decoder,
                                                      c.relative_attention_num_buckets,
                                                      c.relative_attention_max_distance))
        rel = jnp.arange(num_keys, dtype=jnp.int32)[None, :] - q_slots[:, None]  # [T, S]
        buckets = table[jnp.clip(rel + num_keys - 1, 0, 2 * num_keys - 2)]  # [T, S]
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]  # [1, nH, T, S]

    def __call__(
        self,
        x: Array,
        kv_states: Array,
        mask_bias: Array,
        position_bias: Array | None,
        q_slots: Array,
        deterministic: bool,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
    ) -> tuple[Array, Array | None, KVCache | None]:
        """x: [B, T, H] queries; kv_states: [B, S', H] (x itself, or the encoder state).

        mask_bias: [B, 1, T, S]; position_bias: [1, nH, T, S] from block 0, or None here
        in block 0 (computed) and in cross-attention (none). Returns (out [B, T, H], the
        position bias to hand on, the updated cache).
        """
        c = self.config
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, c.num_heads, c.d_kv)
        k = self.k(kv_states).reshape(b, kv_states.shape[1], c.num_heads, c.d_kv)
        v = self.v(kv_states).reshape(b, kv_states.shape[1], c.num_heads, c.d_kv)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        if position_bias is None and self.has_relative_attention_bias:
            position_bias = self.compute_bias(q_slots, k.shape[1])
        bias = mask_bias if position_bias is None else mask_bias + position_bias  # [B, 1 | nH, T, S]
        # With one KV head per query head (no GQA), dot_product_attention's [B, nH, 1, T, S]
        # view of a per-head bias lines up with its [B, Hkv, groups=1, T, S] scores.
        out = dot_product_attention(q, k, v, bias, scale=1.0, dropout=self.dropout, deterministic=deterministic)
        return self.o(out.reshape(b, t, c.num_heads * c.d_kv)), position_bias, cache


def _norm(config: Any, dtype: Any, param_dtype: Any, name: str) -> RMSNorm:
    # T5LayerNorm: RMS over float32, no mean, no bias.
    return RMSNorm(config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


class T5LayerSelfAttention(nn.Module):
    config: Any
    is_decoder: bool
    has_relative_attention_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.SelfAttention = T5Attention(self.config, self.is_decoder, self.has_relative_attention_bias,
                                         self.dtype, self.param_dtype)
        self.layer_norm = _norm(self.config, self.dtype, self.param_dtype, "layer_norm")
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, mask_bias: Array, position_bias: Array | None, q_slots: Array,
                 deterministic: bool, cache: KVCache | None, cache_index: Array) -> tuple[Array, Array, KVCache | None]:
        h = self.layer_norm(x)
        out, position_bias, cache = self.SelfAttention(h, h, mask_bias, position_bias, q_slots, deterministic,
                                                       cache, cache_index)
        return x + self.dropout(out, deterministic=deterministic), position_bias, cache


class T5LayerCrossAttention(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.EncDecAttention = T5Attention(self.config, True, False, self.dtype, self.param_dtype)
        self.layer_norm = _norm(self.config, self.dtype, self.param_dtype, "layer_norm")
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, encoder_states: Array, mask_bias: Array, q_slots: Array,
                 deterministic: bool) -> Array:
        out, _, _ = self.EncDecAttention(self.layer_norm(x), encoder_states, mask_bias, None, q_slots, deterministic)
        return x + self.dropout(out, deterministic=deterministic)


class T5DenseActDense(nn.Module):
    """relu (or any `{act}`) feed-forward: wo(dropout(act(wi(x))))."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.wi = dense(c.d_ff, "wi", self.dtype, self.param_dtype, False, c.initializer_factor * c.d_model**-0.5)
        self.wo = dense(c.d_model, "wo", self.dtype, self.param_dtype, False, c.initializer_factor * c.d_ff**-0.5)
        self.act = activation(c.dense_act_fn)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.wo(self.dropout(self.act(self.wi(x)), deterministic=deterministic))


class T5DenseGatedActDense(nn.Module):
    """gated-gelu (T5 v1.1, Flan, mT5) feed-forward: wo(dropout(act(wi_0(x)) * wi_1(x)))."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        std_in, std_out = c.initializer_factor * c.d_model**-0.5, c.initializer_factor * c.d_ff**-0.5
        self.wi_0 = dense(c.d_ff, "wi_0", self.dtype, self.param_dtype, False, std_in)
        self.wi_1 = dense(c.d_ff, "wi_1", self.dtype, self.param_dtype, False, std_in)
        self.wo = dense(c.d_model, "wo", self.dtype, self.param_dtype, False, std_out)
        self.act = activation(c.dense_act_fn)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.wo(self.dropout(self.act(self.wi_0(x)) * self.wi_1(x), deterministic=deterministic))


class T5LayerFF(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        ff = T5DenseGatedActDense if self.config.is_gated_act else T5DenseActDense
        self.DenseReluDense = ff(self.config, self.dtype, self.param_dtype)
        self.layer_norm = _norm(self.config, self.dtype, self.param_dtype, "layer_norm")
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        out = self.DenseReluDense(self.layer_norm(x), deterministic)
        return x + self.dropout(out, deterministic=deterministic)


class T5LayerList(nn.Module):
    """torch's `T5Block.layer` ModuleList: "0" self-attention, "1" cross-attention (decoder), then FF."""

    config: Any
    is_decoder: bool
    has_relative_attention_bias: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.self_attention = T5LayerSelfAttention(self.config, self.is_decoder, self.has_relative_attention_bias,
                                                   name="0", **kw)
        if self.is_decoder:
            self.cross_attention = T5LayerCrossAttention(self.config, name="1", **kw)
        self.ff = T5LayerFF(self.config, name="2" if self.is_decoder else "1", **kw)


class T5Block(nn.Module):
    config: Any
    layer_idx: int
    is_decoder: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.layer = T5LayerList(self.config, self.is_decoder, self.layer_idx == 0, self.dtype, self.param_dtype)

    def __call__(
        self,
        x: Array,
        mask_bias: Array,
        position_bias: Array | None,
        q_slots: Array,
        encoder_states: Array | None,
        cross_bias: Array | None,
        deterministic: bool,
        cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, Array, KVCache | None]:
        x, position_bias, cache = self.layer.self_attention(x, mask_bias, position_bias, q_slots, deterministic,
                                                            cache, cache_index)
        if self.is_decoder:
            x = self.layer.cross_attention(x, encoder_states, cross_bias, q_slots, deterministic)
        return self.layer.ff(x, deterministic), position_bias, cache


class T5Stack(nn.Module):
    """The encoder or the decoder (without its embedding, which is the shared one)."""

    config: Any
    is_decoder: bool
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.block = make_stack(T5Block, self.num_layers, "block", config=self.config, is_decoder=self.is_decoder,
                                dtype=self.dtype, param_dtype=self.param_dtype)
        self.final_layer_norm = _norm(self.config, self.dtype, self.param_dtype, "final_layer_norm")
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(
        self,
        embeds: Array,
        mask: Array,
        encoder_states: Array | None,
        encoder_mask: Array | None,
        deterministic: bool,
        output_hidden_states: bool,
        cache: list[KVCache] | None,
        cache_index: Array,
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        """embeds: [B, T, H]; mask: [B, S] over the (cache) key slots; encoder_*: decoder only."""
        q_slots = query_slots(embeds.shape[1], cache_index)  # [T]
        mask_bias = attention_bias(mask, q_slots, causal=self.is_decoder)  # [B, 1, T, S]
        cross_bias = attention_bias(encoder_mask, q_slots, causal=False) if self.is_decoder else None  # [B,1,T,Te]
        x = self.dropout(embeds, deterministic=deterministic)
        position_bias = None
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.block.blocks):
            hidden.append(x)
            x, position_bias, layer_cache = block(x, mask_bias, position_bias, q_slots, encoder_states, cross_bias,
                                                  deterministic, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        x = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class T5ForConditionalGeneration(nn.Module):
    """T5 / mT5 with its LM head. Contract: `trlax.models.seq2seq` (module docstring)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=normal_init(c.initializer_factor), **kw)
        self.encoder = T5Stack(c, False, c.num_layers, **kw)
        self.decoder = T5Stack(c, True, c.num_decoder_layers, **kw)
        if not tied_lm_head(c):
            self.lm_head = dense(c.vocab_size, "lm_head", use_bias=False, std=c.initializer_factor, **kw)

    def encode(
        self, input_ids: Array, attention_mask: Array, *, deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array, tuple[Array, ...] | None]:
        """Encoder: ids [B, Te], mask [B, Te] -> (last hidden state [B, Te, H], hidden states | None)."""
        h, hidden, _ = self.encoder(self.shared(input_ids), attention_mask, None, None, deterministic,
                                    output_hidden_states, None, jnp.zeros((), jnp.int32))
        return h, hidden

    def decode(
        self,
        decoder_input_ids: Array,
        decoder_attention_mask: Array,
        encoder_last_hidden_state: Array,
        encoder_attention_mask: Array,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> Seq2SeqLMOutput:
        """Decoder + LM head: ids [B, T], mask [B, S] (S = T without a cache) -> Seq2SeqLMOutput."""
        c = self.config
        h, hidden, cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                                        encoder_last_hidden_state, encoder_attention_mask, deterministic,
                                        output_hidden_states, cache, jnp.asarray(cache_index, jnp.int32))
        if tied_lm_head(c):
            logits = self.shared.attend(h * c.d_model**-0.5)
        else:
            logits = self.lm_head(h)
        return Seq2SeqLMOutput(logits=logits.astype(jnp.float32), last_hidden_state=h,
                               encoder_last_hidden_state=encoder_last_hidden_state,
                               decoder_hidden_states=hidden, cache=cache)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        decoder_input_ids: Array,
        decoder_attention_mask: Array,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> Seq2SeqLMOutput:
        enc, enc_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic,
                                      output_hidden_states=output_hidden_states)
        out = self.decode(decoder_input_ids, decoder_attention_mask, enc, attention_mask,
                          deterministic=deterministic, output_hidden_states=output_hidden_states)
        return out.replace(encoder_hidden_states=enc_hidden)


def _validate(config: Any) -> None:
    if config.dense_act_fn not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"T5 feed_forward_proj={config.feed_forward_proj!r} (activation {config.dense_act_fn!r}) is not "
            f"supported by trlax; supported activations: {sorted(ACTIVATIONS)} (e.g. 'relu', 'gated-gelu')."
        )


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    """Decoder self-attention cache: one {"k", "v"} [B, max_len, nH, d_kv] per decoder block."""
    return [empty_kv_cache(batch, max_len, config.num_heads, config.d_kv, dtype)
            for _ in range(config.num_decoder_layers)]


def _tied_keys(config: Any) -> tuple[str, ...]:
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    return (*tied, "lm_head.weight") if tied_lm_head(config) else tied


SPEC = Seq2SeqSpec(
    model_types=("t5", "mt5"),
    module=T5ForConditionalGeneration,
    hf_architecture="T5ForConditionalGeneration",
    num_layers=lambda c: c.num_decoder_layers,
    layer_pattern="decoder.block.{layer}",
    init_cache=_init_cache,
    # transformers ignores a stray cross-attention bias table in decoder block 0 too.
    ignored_keys=(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",),
    tied_keys=_tied_keys,
    validate=_validate,
    lora_targets=("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"),
    max_positions=lambda c: None,  # relative positions: no fixed limit
    key_defaults=lambda c: {} if tied_lm_head(c) else {"lm_head.weight": "shared.weight"},
)
