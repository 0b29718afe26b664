"""Granite (`model_type` granite: IBM Granite 3.x dense): the Llama block with four multipliers.

What differs from Llama, all as transformers' GraniteForCausalLM computes it:
- the embeddings are multiplied by `embedding_multiplier`;
- each attention and MLP output by `residual_multiplier` before the residual add;
- attention scores by `attention_multiplier` (instead of head_dim ** -0.5);
- the logits are divided by `logits_scaling`.
Biases follow `attention_bias` (q/k/v/o) and `mlp_bias`, as Llama's. Param paths are Llama's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trlax.models import llama
from trlax.models.attention import Array


def granite_options(config: Any) -> llama.DecoderOptions:
    """DecoderOptions of a granite config: Llama's biases, the attention multiplier as the score scale."""
    return llama.configured_options(config, attn_scale=float(config.attention_multiplier),
                                    **llama.without_sliding(config))


class GraniteDecoderLayer(llama.LlamaDecoderLayer):
    def residual_branch(self, out: Array, deterministic: bool) -> Array:
        return out * self.config.residual_multiplier  # in the compute dtype, as transformers


class GraniteModel(llama.LlamaModel):
    make_options = staticmethod(granite_options)
    layer_cls_for = staticmethod(lambda config: GraniteDecoderLayer)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return super().embed(input_ids, position_ids, deterministic) * self.config.embedding_multiplier


class GraniteForCausalLM(llama.LlamaForCausalLM):
    backbone_cls = GraniteModel

    def logits(self, h: Array) -> Array:
        return super().logits(h) / self.config.logits_scaling  # [B, T, V] in the compute dtype, as transformers


SPEC = dataclasses.replace(
    llama.SPEC, model_types=("granite",), module=GraniteForCausalLM, hf_architecture="GraniteForCausalLM",
    peft_targets=(),  # PEFT has no default target_modules for granite
    validate=llama.checked_by_options(granite_options), forward_config_fields=("logits_scaling",),  # no sliding window
)
