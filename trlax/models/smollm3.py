"""SmolLM3 (`model_type` smollm3): the Llama block with RoPE left out of some layers (NoPE).

What differs from Llama, all as transformers' SmolLM3ForCausalLM computes it:
- a layer rotates q and k only when `no_rope_layers[layer]` is 1 (the default config leaves out
  every fourth layer's RoPE: `no_rope_layer_interval`);
- q/k/v/o carry biases when `attention_bias`, the MLP when `mlp_bias`;
- sliding-window layers where `layer_types` says "sliding_attention" (transformers' default
  marks the NoPE layers so when `use_sliding_window` and `sliding_window` are set).
Param paths are Llama's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.layers import activation
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.llama import (
    DecoderOptions,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    check_causal,
    decoder_options,
    validate_rope,
)


def smollm3_options(config: Any) -> DecoderOptions:
    """DecoderOptions of a smollm3 config: Llama's biases and per-layer sliding windows."""
    check_causal(config)
    bias = bool(config.attention_bias)
    return decoder_options(config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(config.mlp_bias))


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    def attention(self, x: Array, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                  cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        uses_rope = bool(self.config.no_rope_layers[self.layer_idx])
        return super().attention(x, masks, rotary if uses_rope else None, deterministic, cache, cache_index)


class SmolLM3Model(LlamaModel):
    make_options = staticmethod(smollm3_options)
    layer_cls_for = staticmethod(lambda config: SmolLM3DecoderLayer)


class SmolLM3ForCausalLM(LlamaForCausalLM):
    backbone_cls = SmolLM3Model


def _validate(config: Any) -> None:
    validate_rope(config)
    activation(config.hidden_act)
    smollm3_options(config)


SPEC = dataclasses.replace(
    LLAMA_SPEC, model_types=("smollm3",), module=SmolLM3ForCausalLM, hf_architecture="SmolLM3ForCausalLM",
    peft_targets=(),  # PEFT has no default target_modules for smollm3
    validate=_validate,
)
