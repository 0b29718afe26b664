"""GPT-Neo (`model_type` "gpt_neo") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPTNeoForCausalLM state dict (`transformer.wte`,
`transformer.h.{i}.attn.attention.q_proj`, ...). What sets GPT-Neo apart from GPT-2:
- layers alternate between global and local attention (`config.attention_layers`, expanded
  from `attention_types`); a local layer sees only keys fewer than `window_size` cache
  slots behind the query (transformers' `tril(ones) ^ tril(ones, -window_size)` buffer);
- attention is NOT scaled by 1/sqrt(head_dim), and q/k/v are separate bias-free Linears
  (`trlax.models.projected_attention`);
- transformers' (eager) GPT-Neo masks twice, its causal/local buffer and then the additive
  padding mask, so a key both hide is -inf and a left-pad query averages the values of the
  pad slots it may see: the bias here is the same sum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, attention_bias
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM
from trlax.models.gpt2 import GPT2Block, GPT2Model
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.projected_attention import ProjectedAttention
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules, tied_lm_head

ATTENTION_TYPES = ("global", "local")


def layer_window(config: Any, layer_idx: int) -> int | None:
    """A local layer sees keys fewer than `window_size` slots behind; a global one all (None)."""
    return config.window_size if config.attention_layers[layer_idx] == "local" else None


class GPTNeoAttention(HFModule):
    """transformers' wrapper module (param paths read `attn.attention.q_proj`), with the residual dropout."""

    def setup(self) -> None:
        c = self.config
        self.attention = ProjectedAttention(c, self.dtype, self.param_dtype, width=c.hidden_size,
                                            num_heads=c.num_heads, qkv_bias=False, scale="none",
                                            dropout_rate=float(c.attention_dropout), zero_unseen_queries=False)
        self.resid_dropout = nn.Dropout(float(c.resid_dropout))

    def __call__(self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        out, cache = self.attention(x, bias, deterministic, cache, cache_index)
        return self.resid_dropout(out, deterministic=deterministic), cache


class GPTNeoBlock(GPT2Block):
    """GPT-2's block with GPT-Neo's attention and MLP sizes; a local layer attends through its window's mask."""

    def setup(self) -> None:
        c = self.config
        self.ln_1 = self.layer_norm(c.layer_norm_epsilon)
        self.attn = GPTNeoAttention(c, self.dtype, self.param_dtype)
        self.ln_2 = self.layer_norm(c.layer_norm_epsilon)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("c_fc", "c_proj"),
                               features=c.intermediate_size if c.intermediate_size is not None else 4 * c.hidden_size,
                               hidden_act=c.activation_function, dropout_rate=float(c.resid_dropout))

    def window(self) -> int | None:
        return layer_window(self.config, self.layer_idx)


class GPTNeoModel(GPT2Model):
    layout = dataclasses.replace(GPT2Model.layout, embedding_dropout="embed_dropout")
    block_cls = GPTNeoBlock

    def layer_windows(self) -> list[int | None]:
        return [layer_window(self.config, i) for i in range(self.config.num_layers)]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        """Per window, the causal/local bias plus the full one (padding too) [B, 1, T, S]: -inf where both hide
        a key, as transformers' GPT-Neo adds its padding mask to the buffer-masked scores."""
        inputs = super().layer_inputs(attention_mask, position_ids, q_slots)
        unpadded = jnp.ones_like(attention_mask)
        inputs["masks"] = {window: bias + attention_bias(unpadded, q_slots, sliding_window=window)
                           for window, bias in inputs["masks"].items()}
        return inputs


class GPTNeoForCausalLM(CausalLM):
    backbone_cls = GPTNeoModel
    backbone_name = "transformer"


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


SPEC = ArchitectureSpec(
    model_types=("gpt_neo",), module=GPTNeoForCausalLM, hf_architecture="GPTNeoForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    # Local layers keep a full-length cache too: their window is a mask, so every layer shares one layout.
    cache_geometry=lambda c: CacheGeometry(c.num_layers, c.num_heads, c.hidden_size // c.num_heads),
    sharding_rules=(*embedding_rules("wte"), (r"(^|/)wpe/embedding$", (None, "embed")),
                    *attention_rules("attention", "q_proj", "[kv]_proj", "out_proj", biases=False),
                    *feed_forward_rules("c_fc", "c_proj")),
    peft_targets=("q_proj", "v_proj"),
    # Mask buffers that older checkpoints saved (transformers no longer persists them).
    ignored_keys=(r".*\.attn\.attention\.(bias|masked_bias)$",),
    tied_keys=tied_lm_head("transformer.wte.weight"), validate=_validate, learned_positions=True,
)
