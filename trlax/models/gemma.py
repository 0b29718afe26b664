"""Gemma and Gemma 2 (`model_type` gemma, gemma2): the Llama modules with Gemma's switches.

What differs from Llama, all as transformers computes it:
- embeddings are multiplied by sqrt(hidden_size), rounded to the compute dtype first;
- RMSNorm weights are stored as (scale - 1) and applied as (1 + w) in float32;
- the MLP is GeGLU (`hidden_act`, `hidden_activation` for Gemma 2: gelu_pytorch_tanh);
- Gemma 2 only: attention scale `query_pre_attn_scalar ** -0.5`, tanh soft-capping of the
  attention scores and of the final logits, "sandwich" norms around attention and MLP
  (`post_attention_layernorm` normalises the attention output, `pre_feedforward_layernorm`
  / `post_feedforward_layernorm` wrap the MLP), and sliding-window layers per `layer_types`.
Param paths are those of transformers' GemmaForCausalLM / Gemma2ForCausalLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.llama import (
    DecoderOptions,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    check_causal,
    decoder_options,
    validate_rope,
    without_sliding,
)


def gemma_options(config: Any) -> DecoderOptions:
    """DecoderOptions for gemma, gemma2 and gemma3_text configs (as their HF modules build them)."""
    check_causal(config)
    bias = bool(getattr(config, "attention_bias", False))
    common = {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "norm_unit_offset": True, "embed_scale": True}
    if config.model_type == "gemma":
        return decoder_options(config, **common, **without_sliding(config))
    if config.model_type in ("gemma2", "gemma3_text"):  # Gemma 3 adds q/k norms
        return decoder_options(
            config,
            hidden_act=config.hidden_activation,
            attn_scale=config.query_pre_attn_scalar**-0.5,
            # transformers' Gemma 3 attention never applies `attn_logit_softcapping` (5.25 sets it but does
            # not pass it on; Gemma 3 checkpoints leave it unset): neither does trlax, for the same numbers.
            attn_softcap=config.attn_logit_softcapping if config.model_type == "gemma2" else None,
            final_softcap=config.final_logit_softcapping,
            qk_norm=config.model_type == "gemma3_text",
            eager_attention=config.model_type == "gemma2",
            **common,
        )
    raise UnsupportedModelError(f"model_type {config.model_type!r} is not a Gemma model")


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """Gemma 2's block: norms before and after both attention and MLP."""

    def setup(self) -> None:
        super().setup()
        self.pre_feedforward_layernorm = self.make_norm(self, self.options)
        self.post_feedforward_layernorm = self.make_norm(self, self.options)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        attn_out, cache = self.attention(self.input_layernorm(x), masks, rotary, deterministic, cache, cache_index)
        x = x + self.post_attention_layernorm(attn_out)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache


class GemmaModel(LlamaModel):
    make_options = staticmethod(gemma_options)
    layer_cls_for = staticmethod(lambda config: Gemma2DecoderLayer if config.model_type == "gemma2"
                                 else LlamaDecoderLayer)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma or Gemma 2 with its head (the model_type picks the block)."""

    backbone_cls = GemmaModel


def _validate(config: Any) -> None:
    validate_rope(config)
    gemma_options(config)


SPEC = dataclasses.replace(LLAMA_SPEC, model_types=("gemma", "gemma2"), module=GemmaForCausalLM,
                           hf_architecture="GemmaForCausalLM", validate=_validate,
                           forward_config_fields=("final_logit_softcapping", "sliding_window", "layer_types"))
