"""GPT-Neo (`model_type` "gpt_neo") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPTNeoForCausalLM state dict (`transformer.wte`,
`transformer.h.{i}.attn.attention.q_proj`, ...). What sets GPT-Neo apart from GPT-2:
- layers alternate between global and local attention (`config.attention_layers`, expanded
  from `attention_types`); a local layer sees only keys fewer than `window_size` cache
  slots behind the query (transformers' `tril(ones) ^ tril(ones, -window_size)` buffer);
- attention is NOT scaled by 1/sqrt(head_dim), and q/k/v are separate bias-free Linears
  (`trlax.models.projected_attention`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, causal_masks
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.projected_attention import ProjectedAttention
from trlax.models.spec import ArchitectureSpec, tied_lm_head
from trlax.models.stack import layer_stack

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
                                            dropout_rate=float(c.attention_dropout))
        self.resid_dropout = nn.Dropout(float(c.resid_dropout))

    def __call__(self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        out, cache = self.attention(x, bias, deterministic, cache, cache_index)
        return self.resid_dropout(out, deterministic=deterministic), cache


class GPTNeoMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.c_fc = self.linear(c.intermediate_size if c.intermediate_size is not None else 4 * c.hidden_size)
        self.c_proj = self.linear(c.hidden_size)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(float(c.resid_dropout))

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))), deterministic=deterministic)


class GPTNeoBlock(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.ln_1 = self.layer_norm(c.layer_norm_epsilon)
        self.attn = GPTNeoAttention(c, self.dtype, self.param_dtype)
        self.ln_2 = self.layer_norm(c.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(c, self.dtype, self.param_dtype)

    def __call__(self, x: Array, *, masks: dict[Any, Array], deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        bias = masks[layer_window(self.config, self.layer_idx)]  # this layer's global or local mask
        attn_out, cache = self.attn(self.ln_1(x), bias, deterministic, cache, cache_index)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x), deterministic), cache


class GPTNeoModel(DecoderBackbone):
    embedding_name = "wte"
    final_norm_name = "ln_f"
    stack_name = "h"

    def setup(self) -> None:
        c = self.config
        self.wte = self.embedding(c.vocab_size, c.hidden_size)
        self.wpe = self.embedding(c.max_position_embeddings, c.hidden_size)
        self.drop = nn.Dropout(float(c.embed_dropout))
        self.h = layer_stack(GPTNeoBlock, c.num_layers, "h", config=c, dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_f = self.layer_norm(c.layer_norm_epsilon)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.drop(self.wte(input_ids) + self.wpe(position_ids), deterministic=deterministic)  # [B, T, H]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        windows = [layer_window(self.config, i) for i in range(self.config.num_layers)]
        return {"masks": causal_masks(attention_mask, q_slots, windows)}


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
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}", num_layers=lambda c: c.num_layers,
    # Local layers keep a full-length cache too: their window is a mask, so every layer shares one layout.
    cache_geometry=lambda c: CacheGeometry(c.num_layers, c.num_heads, c.hidden_size // c.num_heads),
    sharding_rules=(
        (r"(^|/)wte/embedding$", ("vocab", "embed")),
        (r"(^|/)wpe/embedding$", (None, "embed")),
        (r"attention/[qkv]_proj/kernel$", ("embed", "heads")),
        (r"attention/out_proj/kernel$", ("heads", "embed")),
        (r"mlp/c_fc/kernel$", ("embed", "mlp")),
        (r"mlp/c_fc/bias$", ("mlp",)),
        (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    ),
    peft_targets=("q_proj", "v_proj"),
    # Mask buffers that older checkpoints saved (transformers no longer persists them).
    ignored_keys=(r".*\.attn\.attention\.(bias|masked_bias)$",),
    tied_keys=tied_lm_head, validate=_validate, learned_positions=True,
)
