"""Gemma 3 text models (`model_type` gemma3_text, transformers' Gemma3ForCausalLM).

Gemma 2's modules (trlax/models/gemma.py) with what Gemma 3 adds, as transformers computes it:
- q/k RMSNorms over each head, with Gemma's (1 + w) weights, before RoPE;
- sliding-window and global layers (`layer_types`) with their own RoPE parameters:
  `rope_parameters` holds one dict per layer type (local base 10k, global base 1M and
  Gemma 3's linear scaling), so each layer rotates with its type's frequencies;
- soft-capping of attention scores and logits only where the config sets it (None by
  default), the attention scale `query_pre_attn_scalar ** -0.5`, embeddings times sqrt(H).
Param paths are transformers': those of Gemma 2 plus `self_attn.{q,k}_norm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.gemma import SPEC as GEMMA_SPEC
from trlax.models.gemma import Gemma2DecoderLayer, GemmaForCausalLM, GemmaModel, gemma_options
from trlax.models.llama import LAYER_TYPES, PerLayerTypeRope, layer_type_of, sliding_layers, validate_rope


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's block; attention uses the RoPE table of this layer's type."""

    def attention(self, x: Array, masks: dict[Any, Array], rotary: dict[str, tuple[Array, Array]],
                  deterministic: bool, cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        layer_rotary = rotary[layer_type_of(self.options, self.layer_idx)]
        return super().attention(x, masks, layer_rotary, deterministic, cache, cache_index)


class Gemma3TextModel(PerLayerTypeRope, GemmaModel):
    layer_cls_for = staticmethod(lambda config: Gemma3DecoderLayer)


class Gemma3ForCausalLM(GemmaForCausalLM):
    backbone_cls = Gemma3TextModel


def _validate(config: Any) -> None:
    gemma_options(config)  # refuses bidirectional configs and unknown layer types
    for sliding in set(sliding_layers(config)):  # refuses RoPE settings trlax (or transformers) lacks, naming them
        validate_rope(config, layer_type=LAYER_TYPES[sliding])


SPEC = dataclasses.replace(GEMMA_SPEC, model_types=("gemma3_text",), module=Gemma3ForCausalLM,
                           hf_architecture="Gemma3ForCausalLM", validate=_validate)
