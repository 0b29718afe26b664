"""BART (`model_type` bart) in Flax Linen, with the PyTorch module names.

Param paths match transformers' `BartForConditionalGeneration` state dict: `model.shared`,
`model.{encoder,decoder}.embed_positions`, `model.{encoder,decoder}.layernorm_embedding`,
`model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2,
final_layer_norm}`; decoder layers add `encoder_attn` and `encoder_attn_layer_norm`. The
encoder's and decoder's `embed_tokens` and the `lm_head` are `model.shared` (tied keys).

BART is post-LN (residual, then LayerNorm), scales token embeddings by sqrt(d_model) when
`scale_embedding`, and has learned positions stored with an offset of 2 (position p is
row p + 2). Positions are cache slots, as transformers counts them: 0.. regardless of
padding, in the encoder and in the decoder.

`final_logits_bias` [1, V] is a buffer in transformers (saved, never trained): here it is
a param under its own checkpoint key, added to the logits under `stop_gradient`, so it
loads and saves exactly and gets no gradient (mask it out of weight decay if it is not
zero). A checkpoint without it loads with zeros, as transformers does.

Reference models use TRL's `model.decoder.layers.{layer}`. TRL's order-based rule walks
named_parameters, where `model.decoder.embed_positions` precedes the decoder layers but
`model.decoder.layernorm_embedding` follows them.

Not implemented (refused): untied embeddings (`tie_word_embeddings=False`), LayerDrop in
training. Cross-attention keys/values are recomputed from the encoder state on each
`decode` call; the KV cache holds decoder self-attention only.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.layers import (
    ACTIVATIONS,
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
from trlax.models.outputs import Seq2SeqLMOutput
from trlax.models.seq2seq import Seq2SeqSpec

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's fairseq offset


def _layer_norm(dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
    # torch.nn.LayerNorm defaults (eps 1e-5); two-pass variance as torch computes it.
    return nn.LayerNorm(1e-5, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class BartAttention(nn.Module):
    config: Any
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        make = functools.partial(dense, dtype=self.dtype, param_dtype=self.param_dtype, std=c.init_std)
        self.k_proj = make(c.d_model, "k_proj")
        self.v_proj = make(c.d_model, "v_proj")
        self.q_proj = make(c.d_model, "q_proj")
        self.out_proj = make(c.d_model, "out_proj")
        self.dropout = nn.Dropout(c.attention_dropout)

    def __call__(
        self, x: Array, kv_states: Array, bias: Array, deterministic: bool,
        cache: KVCache | None = None, cache_index: Array | int = 0,
    ) -> tuple[Array, KVCache | None]:
        """x: [B, T, H] queries; kv_states: [B, S', H] (x, or the encoder state); bias [B, 1, T, S]."""
        b, t, h = x.shape
        head_dim = h // self.num_heads
        q = self.q_proj(x).reshape(b, t, self.num_heads, head_dim)
        k = self.k_proj(kv_states).reshape(b, kv_states.shape[1], self.num_heads, head_dim)
        v = self.v_proj(kv_states).reshape(b, kv_states.shape[1], self.num_heads, head_dim)
        if cache is not None:
            cache = update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]  # [B, S, nH, D]
        out = dot_product_attention(q, k, v, bias, scale=head_dim**-0.5, dropout=self.dropout,
                                    deterministic=deterministic)
        return self.out_proj(out.reshape(b, t, h)), cache


class BartLayer(nn.Module):
    """An encoder layer, or (is_decoder) a decoder layer with cross-attention."""

    config: Any
    layer_idx: int
    is_decoder: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        heads = c.decoder_attention_heads if self.is_decoder else c.encoder_attention_heads
        ffn = c.decoder_ffn_dim if self.is_decoder else c.encoder_ffn_dim
        self.self_attn = BartAttention(c, heads, **kw)
        self.self_attn_layer_norm = _layer_norm(self.dtype, self.param_dtype, "self_attn_layer_norm")
        if self.is_decoder:
            self.encoder_attn = BartAttention(c, heads, **kw)
            self.encoder_attn_layer_norm = _layer_norm(self.dtype, self.param_dtype, "encoder_attn_layer_norm")
        self.fc1 = dense(ffn, "fc1", std=c.init_std, **kw)
        self.fc2 = dense(c.d_model, "fc2", std=c.init_std, **kw)
        self.final_layer_norm = _layer_norm(self.dtype, self.param_dtype, "final_layer_norm")
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.dropout)
        self.activation_dropout = nn.Dropout(c.activation_dropout)

    def __call__(
        self,
        x: Array,
        self_bias: Array,
        encoder_states: Array | None,
        cross_bias: Array | None,
        deterministic: bool,
        cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        out, cache = self.self_attn(x, x, self_bias, deterministic, cache, cache_index)
        x = self.self_attn_layer_norm(x + self.dropout(out, deterministic=deterministic))
        if self.is_decoder:
            out, _ = self.encoder_attn(x, encoder_states, cross_bias, deterministic)
            x = self.encoder_attn_layer_norm(x + self.dropout(out, deterministic=deterministic))
        out = self.activation_dropout(self.act(self.fc1(x)), deterministic=deterministic)
        out = self.dropout(self.fc2(out), deterministic=deterministic)
        return self.final_layer_norm(x + out), cache


class BartStack(nn.Module):
    """BartEncoder / BartDecoder without `embed_tokens` (it is `model.shared`)."""

    config: Any
    is_decoder: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.d_model, dtype=self.dtype,
                                        param_dtype=self.param_dtype, embedding_init=normal_init(c.init_std))
        n = c.decoder_layers if self.is_decoder else c.encoder_layers
        self.layers = make_stack(BartLayer, n, "layers", config=c, is_decoder=self.is_decoder, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        self.layernorm_embedding = _layer_norm(self.dtype, self.param_dtype, "layernorm_embedding")
        self.dropout = nn.Dropout(c.dropout)

    def __call__(
        self,
        token_embeds: Array,
        mask: Array,
        encoder_states: Array | None,
        encoder_mask: Array | None,
        deterministic: bool,
        output_hidden_states: bool,
        cache: list[KVCache] | None,
        cache_index: Array,
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        """token_embeds: [B, T, H] (already scaled); mask: [B, S] over the (cache) key slots."""
        c = self.config
        layerdrop = c.decoder_layerdrop if self.is_decoder else c.encoder_layerdrop
        if not deterministic and layerdrop:
            raise UnsupportedModelError(
                f"BART LayerDrop ({'decoder' if self.is_decoder else 'encoder'}_layerdrop={layerdrop}) is not "
                "implemented in trlax; set it to 0.0 on the config to train.")
        if mask.shape[1] > c.max_position_embeddings:
            raise ValueError(f"BART has {c.max_position_embeddings} positions; got a sequence (or cache) of "
                             f"{mask.shape[1]}")
        q_slots = query_slots(token_embeds.shape[1], cache_index)  # [T]
        x = token_embeds + self.embed_positions(q_slots + POSITION_OFFSET)[None]  # [B, T, H]
        x = self.dropout(self.layernorm_embedding(x), deterministic=deterministic)
        self_bias = attention_bias(mask, q_slots, causal=self.is_decoder)  # [B, 1, T, S]
        cross_bias = attention_bias(encoder_mask, q_slots, causal=False) if self.is_decoder else None
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, layer in enumerate(self.layers.blocks):
            hidden.append(x)
            x, layer_cache = layer(x, self_bias, encoder_states, cross_bias, deterministic,
                                   None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


class BartModel(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=normal_init(c.init_std), **kw)
        self.encoder = BartStack(c, False, **kw)
        self.decoder = BartStack(c, True, **kw)

    def embed(self, ids: Array) -> Array:
        """BartScaledWordEmbedding: the shared table times sqrt(d_model) when scale_embedding."""
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        return self.shared(ids) * scale


class BartForConditionalGeneration(nn.Module):
    """BART with its tied LM head. Contract: `trlax.models.seq2seq` (module docstring)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.model = BartModel(self.config, self.dtype, self.param_dtype)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros,
                                            (1, self.config.vocab_size), self.param_dtype)

    def encode(
        self, input_ids: Array, attention_mask: Array, *, deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array, tuple[Array, ...] | None]:
        """Encoder: ids [B, Te], mask [B, Te] -> (last hidden state [B, Te, H], hidden states | None)."""
        h, hidden, _ = self.model.encoder(self.model.embed(input_ids), attention_mask, None, None, deterministic,
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
        h, hidden, cache = self.model.decoder(self.model.embed(decoder_input_ids), decoder_attention_mask,
                                              encoder_last_hidden_state, encoder_attention_mask, deterministic,
                                              output_hidden_states, cache, jnp.asarray(cache_index, jnp.int32))
        # A buffer in transformers: never trained.
        logits = self.model.shared.attend(h) + jax.lax.stop_gradient(self.final_logits_bias).astype(self.dtype)
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
    if not config.tie_word_embeddings:
        raise UnsupportedModelError(
            "BART with tie_word_embeddings=False (separate encoder, decoder and output embeddings) is not "
            "supported by trlax; use a config with tied embeddings.")
    if config.activation_function not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"BART activation_function={config.activation_function!r} is not supported by trlax; "
            f"supported: {sorted(ACTIVATIONS)}")


def _init_cache(config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
    """Decoder self-attention cache: one {"k", "v"} [B, max_len, nH, D] per decoder layer."""
    heads = config.decoder_attention_heads
    return [empty_kv_cache(batch, max_len, heads, config.d_model // heads, dtype)
            for _ in range(config.decoder_layers)]


SPEC = Seq2SeqSpec(
    model_types=("bart",),
    module=BartForConditionalGeneration,
    hf_architecture="BartForConditionalGeneration",
    num_layers=lambda c: c.decoder_layers,
    layer_pattern="model.decoder.layers.{layer}",
    init_cache=_init_cache,
    ignored_keys=(r"^model\.(encoder|decoder)\.version$",),  # fairseq leftovers transformers ignores too
    tied_keys=lambda c: ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"),
    validate=_validate,
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    raw_keys=("final_logits_bias",),
    key_defaults=lambda c: {"final_logits_bias": None},
)
