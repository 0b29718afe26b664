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
from trlax.models.attention import Array, attend
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.encoder_decoder import EncoderDecoderLM, EncoderDecoderStack
from trlax.models.layers import (
    ACTIVATIONS,
    Dense,
    HFModule,
    RMSNorm,
    activation,
    clamp_float16_overflow,
    normal_init,
)
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules
from trlax.models.stack import layer_stack


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


class T5Attention(HFModule, kw_only=True):
    """T5 attention: unscaled scores plus a relative position bias (none in cross-attention)."""

    is_decoder: bool
    has_relative_attention_bias: bool = False  # block 0's self-attention owns the table

    def setup(self) -> None:
        c = self.config
        f = c.initializer_factor
        inner = c.num_heads * c.d_kv
        self.q = self.linear(inner, use_bias=False, std=f * (c.d_model * c.d_kv) ** -0.5)
        self.k = self.linear(inner, use_bias=False, std=f * c.d_model**-0.5)
        self.v = self.linear(inner, use_bias=False, std=f * c.d_model**-0.5)
        self.o = self.linear(c.d_model, use_bias=False, std=f * inner**-0.5)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = self.embedding(c.relative_attention_num_buckets, c.num_heads,
                                                          std=f * c.d_model**-0.5)
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

    def __call__(self, x: Array, kv_states: Array, bias: Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: Array | int = 0) -> tuple[Array, KVCache | None]:
        """x: [B, T, H] queries; kv_states: [B, S', H] (x itself, or the encoder state); bias:
        [B, 1 | nH, T, S] (mask plus, in self-attention, the relative position bias)."""
        c = self.config
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, c.num_heads, c.d_kv)
        k = self.k(kv_states).reshape(b, kv_states.shape[1], c.num_heads, c.d_kv)
        v = self.v(kv_states).reshape(b, kv_states.shape[1], c.num_heads, c.d_kv)
        # transformers hands SDPA T5's position bias as an additive float mask: a query that sees no key gets the
        # values' average, the eager result.
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=1.0, dropout=self.dropout,
                            deterministic=deterministic, zero_unseen_queries=False)
        return self.o(out.reshape(b, t, c.num_heads * c.d_kv)), cache


def _norm(module: HFModule) -> RMSNorm:
    # T5LayerNorm: RMS over float32, no mean, no bias.
    return module.rms_norm(module.config.layer_norm_epsilon)


def residual_sum(x: Array, out: Array) -> Array:
    """x + out, in float32 where their dtypes differ (a float16 T5's float32 `wo` output makes the residual
    float32, as in transformers): the promotion written out, so strict dtype promotion runs too."""
    dtype = x.dtype if x.dtype == out.dtype else jnp.float32
    return x.astype(dtype) + out.astype(dtype)


class T5LayerSelfAttention(HFModule, kw_only=True):
    is_decoder: bool
    has_relative_attention_bias: bool

    def setup(self) -> None:
        self.SelfAttention = T5Attention(self.config, self.dtype, self.param_dtype, is_decoder=self.is_decoder,
                                         has_relative_attention_bias=self.has_relative_attention_bias)
        self.layer_norm = _norm(self)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.layer_norm(x)
        out, cache = self.SelfAttention(h, h, bias, deterministic, cache, cache_index)
        return residual_sum(x, self.dropout(out, deterministic=deterministic)), cache


class T5LayerCrossAttention(HFModule):
    def setup(self) -> None:
        self.EncDecAttention = T5Attention(self.config, self.dtype, self.param_dtype, is_decoder=True)
        self.layer_norm = _norm(self)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, encoder_states: Array, bias: Array, deterministic: bool) -> Array:
        out, _ = self.EncDecAttention(self.layer_norm(x), encoder_states, bias, deterministic)
        return residual_sum(x, self.dropout(out, deterministic=deterministic))


def output_projection(module: HFModule, std: float) -> Dense:
    """The feed-forward's `wo` [d_ff, d_model]. A float16 T5 keeps it in float32, as transformers does
    (`_keep_in_fp32_modules`): float16 params are float32 here, and a float16 input is cast up. The residual
    it is added to is then float32 from the first feed-forward on, in PyTorch and here alike. A float16
    save writes it float32 too (`SPEC.float32_keys`)."""
    def widened(dtype: Any) -> Any:
        return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype

    return Dense(module.config.d_model, use_bias=False, dtype=widened(module.dtype),
                 param_dtype=widened(module.param_dtype), kernel_init=normal_init(std))


class T5DenseReluDense(HFModule):
    """The feed-forward: wo(dropout(act(wi(x)))) with relu (or any `{act}`), transformers' T5DenseActDense;
    with `is_gated_act` (gated-gelu: T5 v1.1, Flan, mT5) wo(dropout(act(wi_0(x)) * wi_1(x))), its
    T5DenseGatedActDense."""

    def setup(self) -> None:
        c = self.config
        std_in = c.initializer_factor * c.d_model**-0.5
        if c.is_gated_act:
            self.wi_0 = self.linear(c.d_ff, use_bias=False, std=std_in)
            self.wi_1 = self.linear(c.d_ff, use_bias=False, std=std_in)
        else:
            self.wi = self.linear(c.d_ff, use_bias=False, std=std_in)
        self.wo = output_projection(self, std=c.initializer_factor * c.d_ff**-0.5)
        self.act = activation(c.dense_act_fn)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.config.is_gated_act else self.act(self.wi(x))
        return self.wo(self.dropout(h, deterministic=deterministic))


class T5LayerFF(HFModule):
    def setup(self) -> None:
        self.DenseReluDense = T5DenseReluDense(self.config, self.dtype, self.param_dtype)
        self.layer_norm = _norm(self)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        out = self.DenseReluDense(self.layer_norm(x), deterministic)
        return residual_sum(x, self.dropout(out, deterministic=deterministic))


class T5LayerList(HFModule, kw_only=True):
    """torch's `T5Block.layer` ModuleList: "0" self-attention, "1" cross-attention (decoder), then FF."""

    is_decoder: bool
    has_relative_attention_bias: bool

    def setup(self) -> None:
        kw = {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.self_attention = T5LayerSelfAttention(**kw, is_decoder=self.is_decoder, name="0",
                                                   has_relative_attention_bias=self.has_relative_attention_bias)
        if self.is_decoder:
            self.cross_attention = T5LayerCrossAttention(**kw, name="1")
        self.ff = T5LayerFF(**kw, name="2" if self.is_decoder else "1")


class T5Block(HFModule, kw_only=True):
    is_decoder: bool
    layer_idx: int = 0

    def setup(self) -> None:
        self.layer = T5LayerList(self.config, self.dtype, self.param_dtype, is_decoder=self.is_decoder,
                                 has_relative_attention_bias=self.layer_idx == 0)

    def position_bias(self, q_slots: Array, num_keys: int) -> Array:
        """Block 0 owns the relative position table every block of its stack adds: [1, nH, T, S]."""
        return self.layer.self_attention.SelfAttention.compute_bias(q_slots, num_keys)

    def __call__(self, x: Array, *, self_bias: Array, cross_bias: Array | None, encoder_states: Array | None,
                 deterministic: bool, cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        # In float16 each sub-layer's output is clamped when it overflowed, as transformers does.
        x, cache = self.layer.self_attention(x, self_bias, deterministic, cache, cache_index)
        x = clamp_float16_overflow(x)
        if self.is_decoder:
            x = clamp_float16_overflow(self.layer.cross_attention(x, encoder_states, cross_bias, deterministic))
        return clamp_float16_overflow(self.layer.ff(x, deterministic)), cache


class T5Stack(EncoderDecoderStack):
    """The encoder or the decoder (without its embedding, which is the shared one)."""

    stack_name = "block"

    def setup(self) -> None:
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        self.block = layer_stack(T5Block, n, "block", config=c, is_decoder=self.is_decoder, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        self.final_layer_norm = _norm(self)
        self.dropout = nn.Dropout(c.dropout_rate)

    def prepare(self, embeds: Array, q_slots: Array, deterministic: bool) -> Array:
        return self.dropout(embeds, deterministic=deterministic)

    def layer_inputs(self, mask: Array, encoder_mask: Array | None, q_slots: Array) -> dict[str, Any]:
        # Positions are cache slots (HF counts them from 0 regardless of padding); S = mask.shape[1].
        position_bias = self.block.blocks[0].position_bias(q_slots, mask.shape[1])  # [1, nH, T, S]
        inputs = super().layer_inputs(mask, encoder_mask, q_slots)
        return {**inputs, "self_bias": inputs["self_bias"] + position_bias.astype(jnp.float32)}

    def finish(self, x: Array, deterministic: bool) -> Array:
        return self.dropout(self.final_layer_norm(x), deterministic=deterministic)


class T5ForConditionalGeneration(EncoderDecoderLM):
    """T5 / mT5 with its LM head. Contract: `trlax.models.encoder_decoder` (module docstring)."""

    def setup(self) -> None:
        c = self.config
        kw = {"config": c, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.shared = self.embedding(c.vocab_size, c.d_model, std=c.initializer_factor)
        self.encoder = T5Stack(**kw, is_decoder=False)
        self.decoder = T5Stack(**kw, is_decoder=True)
        if not tied_lm_head(c):
            self.lm_head = self.linear(c.vocab_size, use_bias=False, std=c.initializer_factor)

    def embed_tokens(self, ids: Array) -> Array:
        return self.shared(ids)

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        return self.encoder, self.decoder

    def lm_logits(self, h: Array) -> Array:
        if tied_lm_head(self.config):
            return self.shared.attend(h * self.config.d_model**-0.5)
        return self.lm_head(h)


def _validate(config: Any) -> None:
    if config.dense_act_fn not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"T5 feed_forward_proj={config.feed_forward_proj!r} (activation {config.dense_act_fn!r}) is not "
            f"supported by trlax; supported activations: {sorted(ACTIVATIONS)} (e.g. 'relu', 'gated-gelu')."
        )


def _tied_keys(config: Any) -> dict[str, str]:
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    return dict.fromkeys((*tied, "lm_head.weight") if tied_lm_head(config) else tied, "shared.weight")


SPEC = ArchitectureSpec(
    model_types=("t5", "mt5"), module=T5ForConditionalGeneration, hf_architecture="T5ForConditionalGeneration",
    base_model_prefix="", layer_pattern="decoder.block.{layer}", num_layers=lambda c: c.num_decoder_layers,
    cache_geometry=lambda c: CacheGeometry(c.num_decoder_layers, c.num_heads, c.d_kv),
    sharding_rules=(*embedding_rules("shared"), (r"relative_attention_bias/embedding$", (None, "heads")),
                    *attention_rules("/(SelfAttention|EncDecAttention)", "q", "[kv]", "o", biases=False),
                    *feed_forward_rules("wi(_0|_1)?", "wo", scope="/DenseReluDense/", biases=False)),
    peft_targets=("q", "v"),
    # transformers ignores a stray cross-attention bias table in decoder block 0 too.
    ignored_keys=(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",),
    float32_keys=(r"\.DenseReluDense\.wo\.weight$",),  # see output_projection
    tied_keys=_tied_keys, validate=_validate,
    max_positions=lambda c: None,  # relative positions: no fixed limit
    is_encoder_decoder=True,
    key_defaults=lambda c: {} if tied_lm_head(c) else {"lm_head.weight": "shared.weight"},
)
