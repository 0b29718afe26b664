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

import math
from typing import Any

import flax.linen as nn
import jax

from trlax.errors import InputError, UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.encoder_decoder import EncoderDecoderLM, EncoderDecoderStack
from trlax.models.layers import ACTIVATIONS, HFModule, activation, clamp_float16_overflow
from trlax.models.projected_attention import ProjectedAttention
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules
from trlax.models.stack import layer_stack

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's fairseq offset


def _layer_norm(module: HFModule, name: str) -> nn.LayerNorm:
    return module.layer_norm(1e-5, name=name)  # torch.nn.LayerNorm's default eps


class BartLayer(HFModule, kw_only=True):
    """An encoder layer, or (is_decoder) a decoder layer with cross-attention."""

    is_decoder: bool
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        kw = {"config": c, "dtype": self.dtype, "param_dtype": self.param_dtype}
        heads = c.decoder_attention_heads if self.is_decoder else c.encoder_attention_heads
        attention = {**kw, "width": c.d_model, "num_heads": heads, "dropout_rate": c.attention_dropout}
        self.self_attn = ProjectedAttention(**attention)
        self.self_attn_layer_norm = _layer_norm(self, "self_attn_layer_norm")
        if self.is_decoder:
            self.encoder_attn = ProjectedAttention(**attention)
            self.encoder_attn_layer_norm = _layer_norm(self, "encoder_attn_layer_norm")
        self.fc1 = self.linear(c.decoder_ffn_dim if self.is_decoder else c.encoder_ffn_dim)
        self.fc2 = self.linear(c.d_model)
        self.final_layer_norm = _layer_norm(self, "final_layer_norm")
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.dropout)
        self.activation_dropout = nn.Dropout(c.activation_dropout)

    def __call__(self, x: Array, *, self_bias: Array, cross_bias: Array | None, encoder_states: Array | None,
                 deterministic: bool, cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        out, cache = self.self_attn(x, self_bias, deterministic, cache, cache_index)
        x = self.self_attn_layer_norm(x + self.dropout(out, deterministic=deterministic))
        if self.is_decoder:
            out, _ = self.encoder_attn(x, cross_bias, deterministic, kv_states=encoder_states)
            x = self.encoder_attn_layer_norm(x + self.dropout(out, deterministic=deterministic))
        out = self.activation_dropout(self.act(self.fc1(x)), deterministic=deterministic)
        out = self.dropout(self.fc2(out), deterministic=deterministic)
        x = self.final_layer_norm(x + out)
        return (x if self.is_decoder else clamp_float16_overflow(x, on_nan=True)), cache


class BartStack(EncoderDecoderStack):
    """BartEncoder / BartDecoder without `embed_tokens` (it is `model.shared`)."""

    def setup(self) -> None:
        c = self.config
        self.embed_positions = self.embedding(c.max_position_embeddings + POSITION_OFFSET, c.d_model)
        n = c.decoder_layers if self.is_decoder else c.encoder_layers
        self.layers = layer_stack(BartLayer, n, "layers", config=c, is_decoder=self.is_decoder, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.layernorm_embedding = _layer_norm(self, "layernorm_embedding")
        self.dropout = nn.Dropout(c.dropout)

    def prepare(self, embeds: Array, q_slots: Array, deterministic: bool) -> Array:
        """token embeds [B, T, H] (already scaled) + learned positions of the slots, then norm and dropout."""
        c = self.config
        layerdrop = c.decoder_layerdrop if self.is_decoder else c.encoder_layerdrop
        if not deterministic and layerdrop:
            raise UnsupportedModelError(
                f"BART LayerDrop ({'decoder' if self.is_decoder else 'encoder'}_layerdrop={layerdrop}) is not "
                "implemented in trlax; set it to 0.0 on the config to train.")
        x = embeds + self.embed_positions(q_slots + POSITION_OFFSET)[None]  # [B, T, H]
        return self.dropout(self.layernorm_embedding(x), deterministic=deterministic)

    def layer_inputs(self, mask: Array, encoder_mask: Array | None, q_slots: Array) -> dict[str, Any]:
        c = self.config
        if mask.shape[1] > c.max_position_embeddings:
            raise InputError(f"BART has {c.max_position_embeddings} positions; got a sequence (or cache) of "
                             f"{mask.shape[1]}")
        return super().layer_inputs(mask, encoder_mask, q_slots)


class BartModel(HFModule):
    def setup(self) -> None:
        c = self.config
        kw = {"config": c, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.shared = self.embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)  # as BartScaledWordEmbedding
        self.encoder = BartStack(**kw, is_decoder=False)
        self.decoder = BartStack(**kw, is_decoder=True)


class BartForConditionalGeneration(EncoderDecoderLM):
    """BART with its tied LM head. Contract: `trlax.models.encoder_decoder` (module docstring)."""

    def setup(self) -> None:
        self.model = BartModel(self.config, self.dtype, self.param_dtype)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros,
                                            (1, self.config.vocab_size), self.param_dtype)

    def embed_tokens(self, ids: Array) -> Array:
        """BartScaledWordEmbedding: the shared table times sqrt(d_model) when scale_embedding."""
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        return self.model.shared(ids) * scale

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        return self.model.encoder, self.model.decoder

    def lm_logits(self, h: Array) -> Array:
        # final_logits_bias is a buffer in transformers: never trained.
        return self.model.shared.attend(h) + jax.lax.stop_gradient(self.final_logits_bias[None]).astype(self.dtype)


def _validate(config: Any) -> None:
    if not config.tie_word_embeddings:
        raise UnsupportedModelError(
            "BART with tie_word_embeddings=False (separate encoder, decoder and output embeddings) is not "
            "supported by trlax; use a config with tied embeddings.")
    if config.activation_function not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"BART activation_function={config.activation_function!r} is not supported by trlax; "
            f"supported: {sorted(ACTIVATIONS)}")


SPEC = ArchitectureSpec(
    model_types=("bart",), module=BartForConditionalGeneration, hf_architecture="BartForConditionalGeneration",
    base_model_prefix="model", layer_pattern="model.decoder.layers.{layer}", num_layers=lambda c: c.decoder_layers,
    cache_geometry=lambda c: CacheGeometry(c.decoder_layers, c.decoder_attention_heads,
                                           c.d_model // c.decoder_attention_heads),
    sharding_rules=(*embedding_rules("shared"), (r"(^|/)embed_positions/embedding$", (None, "embed")),
                    *attention_rules("(self_attn|encoder_attn)", "q_proj", "[kv]_proj", "out_proj"),
                    *feed_forward_rules("fc1", "fc2", scope="(^|/)")),
    peft_targets=("q_proj", "v_proj"),
    ignored_keys=(r"^model\.(encoder|decoder)\.version$",),  # fairseq leftovers transformers ignores too
    tied_keys=lambda c: dict.fromkeys(("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                       "lm_head.weight"), "model.shared.weight"),
    validate=_validate, learned_positions=True,
    is_encoder_decoder=True, raw_keys=("final_logits_bias",), decoder_inputs_from_input_ids=True,
    key_defaults=lambda c: {"final_logits_bias": None},
)
