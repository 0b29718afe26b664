"""SmolLM3 (`model_type` smollm3): the Llama block with RoPE left out of some layers (NoPE).

What differs from Llama, all as transformers' SmolLM3ForCausalLM computes it:
- a layer rotates q and k only when `no_rope_layers[layer]` is 1 (the default config leaves out
  every fourth layer's RoPE: `no_rope_layer_interval`);
- sliding-window layers where `layer_types` says "sliding_attention" (transformers' default
  marks the NoPE layers so when `use_sliding_window` and `sliding_window` are set).
Biases follow `attention_bias` (q/k/v/o) and `mlp_bias`, as Llama's. Param paths are Llama's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trlax.models import llama
from trlax.models.attention import Array
from trlax.models.cache import KVCache


class SmolLM3DecoderLayer(llama.LlamaDecoderLayer):
    def attention(self, x: Array, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                  cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        uses_rope = bool(self.config.no_rope_layers[self.layer_idx])
        return super().attention(x, masks, rotary if uses_rope else None, deterministic, cache, cache_index)


class SmolLM3Model(llama.LlamaModel):
    make_options = staticmethod(llama.configured_options)
    layer_cls_for = staticmethod(lambda config: SmolLM3DecoderLayer)


class SmolLM3ForCausalLM(llama.LlamaForCausalLM):
    backbone_cls = SmolLM3Model


SPEC = dataclasses.replace(
    llama.SPEC, model_types=("smollm3",), module=SmolLM3ForCausalLM, hf_architecture="SmolLM3ForCausalLM",
    peft_targets=(),  # PEFT has no default target_modules for smollm3
    validate=llama.checked_by_options(llama.configured_options),
)
