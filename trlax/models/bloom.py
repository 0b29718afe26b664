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
from trlax.models.attention import Array, alibi_attention_bias, alibi_slopes, split_heads_qkv
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule
from trlax.models.self_attention import SelfAttention
from trlax.models.spec import ArchitectureSpec, embedding_rules, feed_forward_rules, fused_attention_rules, tied_lm_head
from trlax.models.stack import layer_stack


def head_dim(config: Any) -> int:
    return config.hidden_size // config.n_head


def bloom_gelu(x: Array) -> Array:
    """BloomGelu: the tanh GELU with Megatron's rounded constant 0.79788456."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class BloomAttention(SelfAttention):
    out_proj_name = "dense"

    def setup(self) -> None:
        c = self.config
        self.query_key_value = self.linear(3 * c.hidden_size)
        self.dense = self.linear(c.hidden_size)
        self.attention_dropout = nn.Dropout(c.attention_dropout)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

    def head_counts(self) -> tuple[int, int, int]:
        return self.config.n_head, self.config.n_head, head_dim(self.config)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        return split_heads_qkv(self.query_key_value(x), self.config.n_head)  # HF's per-head [q | k | v]

    def zero_unseen_queries(self) -> bool:
        return False  # transformers runs BLOOM in eager attention

    def project_out(self, out: Array, deterministic: bool) -> Array:
        return self.hidden_dropout(self.dense(out), deterministic=deterministic)


class BloomBlock(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = self.layer_norm(c.layer_norm_epsilon)
        self.self_attention = BloomAttention(c, self.dtype, self.param_dtype)
        self.post_attention_layernorm = self.layer_norm(c.layer_norm_epsilon)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("dense_h_to_4h", "dense_4h_to_h"),
                               features=4 * c.hidden_size, hidden_act=bloom_gelu, dropout_rate=c.hidden_dropout)

    def __call__(self, x: Array, *, bias: Array, deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        """bias: the causal mask + ALiBi [B, nH, T, S] (no rotary)."""
        post_ln_residual = self.config.apply_residual_connection_post_layernorm
        h = self.input_layernorm(x)
        attn, cache = self.self_attention(h, bias, None, deterministic, cache, cache_index)
        x = (h if post_ln_residual else x) + attn
        h = self.post_attention_layernorm(x)
        return (h if post_ln_residual else x) + self.mlp(h, deterministic), cache


class BloomModel(DecoderBackbone):
    layout = BackboneLayout(embedding="word_embeddings", stack="h", final_norm="ln_f", norm_eps="layer_norm_epsilon")

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
        return {"bias": alibi_attention_bias(attention_mask, q_slots, alibi_slopes(self.config.n_head), self.dtype)}


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
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.n_layer, c.n_head, head_dim(c)),
    sharding_rules=(*embedding_rules("word_embeddings"),
                    *fused_attention_rules("self_attention", "query_key_value", "dense"),  # per head [q|k|v]
                    *feed_forward_rules("dense_h_to_4h", "dense_4h_to_h")),
    peft_targets=("query_key_value",),
    tied_keys=tied_lm_head("transformer.word_embeddings.weight"),
    validate=_validate,
    # ALiBi has no position table; transformers does not limit the length either.
    max_positions=lambda c: None,
)
