"""BLOOM (`model_type` "bloom") in Flax Linen, with the PyTorch module names.

Param paths match transformers' BloomForCausalLM state dict (`transformer.word_embeddings`,
`transformer.word_embeddings_layernorm`, `transformer.h.{i}.self_attention.query_key_value`,
..., `transformer.ln_f`; `lm_head` only when untied). What sets BLOOM apart:
- no position embeddings: ALiBi adds slope_h * (key position) to the attention scores,
  the key positions counted from the attention mask (`(cumsum(mask) - 1) * mask`), so
  position_ids are ignored, as transformers ignores them;
- a LayerNorm right after the token embeddings (its output is hidden state 0);
- one fused `query_key_value` laid out per head as [nH, 3, D]; the kernel keeps that
  layout and is split at run time;
- `apply_residual_connection_post_layernorm`: the residual is the normed input instead.
`pretraining_tp > 1` alone changes nothing; with `slow_but_exact` transformers splits the
output projections into slices and drops their biases, which trlax refuses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, alibi_bias, alibi_slopes, attend, attention_bias
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM, DecoderBackbone
from trlax.models.layers import HFModule
from trlax.models.spec import ArchitectureSpec, tied_lm_head
from trlax.models.stack import layer_stack


def head_dim(config: Any) -> int:
    return config.hidden_size // config.n_head


def bloom_gelu(x: Array) -> Array:
    """BloomGelu: the tanh GELU with Megatron's rounded constant 0.79788456."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class BloomAttention(HFModule):
    def setup(self) -> None:
        c = self.config
        self.query_key_value = self.linear(3 * c.hidden_size)
        self.dense = self.linear(c.hidden_size)
        self.attention_dropout = nn.Dropout(c.attention_dropout)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

    def __call__(
        self, x: Array, residual: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        """x, residual: [B, T, H]; bias: causal mask + ALiBi [B, nH, T, S] -> (residual + attention, cache)."""
        c = self.config
        b, t, _ = x.shape
        d = head_dim(c)
        qkv = self.query_key_value(x).reshape(b, t, c.n_head, 3, d)  # HF's per-head [q | k | v]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # 3 x [B, T, nH, D]
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=d**-0.5, dropout=self.attention_dropout,
                            deterministic=deterministic)
        out = self.dense(out.reshape(b, t, c.hidden_size))
        return residual + self.hidden_dropout(out, deterministic=deterministic), cache


class BloomMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.dense_h_to_4h = self.linear(4 * c.hidden_size)
        self.dense_4h_to_h = self.linear(c.hidden_size)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        out = self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))
        return residual + self.hidden_dropout(out, deterministic=deterministic)


class BloomBlock(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = self.layer_norm(c.layer_norm_epsilon)
        self.self_attention = BloomAttention(c, self.dtype, self.param_dtype)
        self.post_attention_layernorm = self.layer_norm(c.layer_norm_epsilon)
        self.mlp = BloomMLP(c, self.dtype, self.param_dtype)

    def __call__(self, x: Array, *, bias: Array, deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        post_ln_residual = self.config.apply_residual_connection_post_layernorm
        h = self.input_layernorm(x)
        x, cache = self.self_attention(h, h if post_ln_residual else x, bias, deterministic, cache, cache_index)
        h = self.post_attention_layernorm(x)
        return self.mlp(h, h if post_ln_residual else x, deterministic), cache


class BloomModel(DecoderBackbone):
    embedding_name = "word_embeddings"
    final_norm_name = "ln_f"

    stack_name = "h"

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = self.embedding(c.vocab_size, c.hidden_size)
        self.word_embeddings_layernorm = self.layer_norm(c.layer_norm_epsilon)
        self.h = layer_stack(BloomBlock, c.n_layer, "h", config=c, dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_f = self.layer_norm(c.layer_norm_epsilon)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [B, T, H]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        # transformers builds ALiBi in the compute dtype and adds it to the causal mask.
        alibi = alibi_bias(attention_mask, alibi_slopes(self.config.n_head)).astype(self.dtype)  # [B, nH, 1, S]
        return {"bias": attention_bias(attention_mask, q_slots) + alibi}  # [B, nH, T, S] float32


class BloomForCausalLM(CausalLM):
    backbone_cls = BloomModel
    backbone_name = "transformer"


def _validate(config: Any) -> None:
    if config.pretraining_tp > 1 and config.slow_but_exact:
        raise UnsupportedModelError(
            f"bloom: slow_but_exact=True with pretraining_tp={config.pretraining_tp} is not supported by trlax "
            "(transformers then computes the output projections in slices without their biases); "
            "use slow_but_exact=False")


SPEC = ArchitectureSpec(
    model_types=("bloom",), module=BloomForCausalLM, hf_architecture="BloomForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}", num_layers=lambda c: c.n_layer,
    cache_geometry=lambda c: CacheGeometry(c.n_layer, c.n_head, head_dim(c)),
    sharding_rules=(
        (r"(^|/)word_embeddings/embedding$", ("vocab", "embed")),
        (r"self_attention/query_key_value/kernel$", ("embed", "heads")),  # fused, per head [q|k|v]
        (r"self_attention/query_key_value/bias$", ("heads",)),
        (r"self_attention/dense/kernel$", ("heads", "embed")),
        (r"mlp/dense_h_to_4h/kernel$", ("embed", "mlp")),
        (r"mlp/dense_h_to_4h/bias$", ("mlp",)),
        (r"mlp/dense_4h_to_h/kernel$", ("mlp", "embed")),
    ),
    peft_targets=("query_key_value",),
    tied_keys=tied_lm_head,
    validate=_validate,
    # ALiBi has no position table; transformers does not limit the length either.
    max_positions=lambda c: None,
)
