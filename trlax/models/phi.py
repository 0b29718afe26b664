"""Phi-1 / Phi-1.5 / Phi-2 (`model_type` phi) in Flax Linen, with transformers' module names.

Param paths match PhiForCausalLM: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v}_proj`,
`model.layers.{i}.self_attn.dense`, `model.layers.{i}.mlp.{fc1,fc2}`,
`model.layers.{i}.input_layernorm`, `model.final_layernorm`, `lm_head` (weight and bias).
What sets Phi apart:
- a parallel block with one LayerNorm: x + attn(ln(x)) + mlp(ln(x));
- partial rotary embeddings: the first `partial_rotary_factor` (0.5 by default) of each head;
- biased projections and a biased LM head;
- optional LayerNorms over each q/k head before RoPE (`qk_layernorm`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, attend, causal_masks
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.llama import ROTARY_BUFFERS, head_dim_of
from trlax.models.rope import apply_rotary, inv_frequencies, rope_parameters, rotary_cos_sin
from trlax.models.spec import ArchitectureSpec
from trlax.models.stack import layer_stack


class PhiAttention(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        d = head_dim_of(c)
        self.q_proj = self.linear(c.num_attention_heads * d)
        self.k_proj = self.linear(c.num_key_value_heads * d)
        self.v_proj = self.linear(c.num_key_value_heads * d)
        self.dense = self.linear(c.hidden_size)
        if c.qk_layernorm:  # over hidden_size // num_attention_heads, as transformers builds them
            self.q_layernorm = self.layer_norm(c.layer_norm_eps)
            self.k_layernorm = self.layer_norm(c.layer_norm_eps)
        self.attention_dropout = nn.Dropout(c.attention_dropout or 0.0)

    def __call__(self, x: Array, bias: Array, rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        d = head_dim_of(c)
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, d)  # [B, T, Hq, D]
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, d)  # [B, T, Hkv, D]
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, d)
        if c.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # the first rot_dim dims of each head
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=d**-0.5, dropout=self.attention_dropout,
                            deterministic=deterministic)
        return self.dense(out.reshape(b, t, c.num_attention_heads * d)), cache


class PhiMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.fc1 = self.linear(c.intermediate_size)
        self.fc2 = self.linear(c.hidden_size)
        self.act = activation(c.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(HFModule):
    """Parallel block: x + dropout(attn(ln(x))) + dropout(mlp(ln(x)))."""

    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.self_attn = PhiAttention(c, self.dtype, self.param_dtype, self.layer_idx)
        self.mlp = PhiMLP(c, self.dtype, self.param_dtype)
        self.input_layernorm = self.layer_norm(c.layer_norm_eps)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.input_layernorm(x)
        attn, cache = self.self_attn(h, masks[None], rotary, deterministic, cache, cache_index)
        mlp = self.mlp(h)
        return (self.resid_dropout(attn, deterministic=deterministic)
                + self.resid_dropout(mlp, deterministic=deterministic) + x), cache


def rotary_inv_freq(config: Any) -> Any:
    """Inverse frequencies [rot_dim / 2] float32 of the rotated part of each head."""
    return inv_frequencies(config, head_dim_of(config), rope_parameters(config).get("partial_rotary_factor", 1.0))


class PhiModel(DecoderBackbone):
    embedding_name = "embed_tokens"
    final_norm_name = "final_layernorm"

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = self.embedding(c.vocab_size, c.hidden_size)
        self.layers = layer_stack(PhiDecoderLayer, c.num_hidden_layers, "layers", config=c, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        self.embed_dropout = nn.Dropout(c.embd_pdrop)
        self.final_layernorm = self.layer_norm(c.layer_norm_eps)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.embed_dropout(self.embed_tokens(input_ids), deterministic=deterministic)  # [B, T, H]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        return {"masks": causal_masks(attention_mask, q_slots, [None]),
                "rotary": rotary_cos_sin(position_ids, rotary_inv_freq(self.config))}  # [B, T, rot_dim] float32


class PhiForCausalLM(CausalLM):
    backbone_cls = PhiModel
    backbone_name = "model"
    head_bias = True


def _validate(config: Any) -> None:
    if config.tie_word_embeddings:
        raise UnsupportedModelError(
            "phi with tie_word_embeddings=True is not supported by trlax (transformers keeps an untied "
            "lm_head.bias next to the tied weight); use tie_word_embeddings=False, as Phi checkpoints do"
        )
    rotary_inv_freq(config)  # raises UnsupportedModelError for a rope_type trlax lacks
    activation(config.hidden_act)


SPEC = ArchitectureSpec(
    model_types=("phi",), module=PhiForCausalLM, hf_architecture="PhiForCausalLM", base_model_prefix="model",
    layer_pattern="model.layers.{layer}", num_layers=lambda c: c.num_hidden_layers,
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_key_value_heads, head_dim_of(c)),
    sharding_rules=(
        (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
        (r"self_attn/q_proj/kernel$", ("embed", "heads")),
        (r"self_attn/[kv]_proj/kernel$", ("embed", "kv_heads")),
        (r"self_attn/q_proj/bias$", ("heads",)),
        (r"self_attn/[kv]_proj/bias$", ("kv_heads",)),
        (r"self_attn/dense/kernel$", ("heads", "embed")),
        (r"mlp/fc1/kernel$", ("embed", "mlp")),
        (r"mlp/fc1/bias$", ("mlp",)),
        (r"mlp/fc2/kernel$", ("mlp", "embed")),
    ),
    peft_targets=("q_proj", "v_proj", "fc1", "fc2"),
    ignored_keys=ROTARY_BUFFERS,
    validate=_validate,
)
