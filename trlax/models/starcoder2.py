"""StarCoder2 (`model_type` starcoder2): the Llama block with LayerNorms and a GELU MLP.

What differs from Llama, all as transformers' Starcoder2ForCausalLM computes it:
- LayerNorms with bias (`norm_epsilon`) instead of RMSNorms, the final `model.norm` too;
- q/k/v/o projections and the MLP carry biases when `use_bias` (the default);
- the MLP is `c_proj(act(c_fc(x)))` (gelu_pytorch_tanh);
- dropout on the embeddings (`embedding_dropout`) and on the attention and MLP outputs
  (`residual_dropout`); a sliding window on every layer when `sliding_window` is set.
Param paths are transformers': `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`model.layers.{i}.mlp.{c_fc,c_proj}`, `model.layers.{i}.{input,post_attention}_layernorm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from trlax.models.layers import FeedForward, HFModule
from trlax.models.llama import (
    LLAMA_SHARDING,
    DecoderOptions,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    checked_by_options,
    decoder_options,
    sliding_everywhere,
)
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.spec import ParamRule, feed_forward_rules


def starcoder2_options(config: Any) -> DecoderOptions:
    """DecoderOptions of a starcoder2 config."""
    bias = config.use_bias
    return decoder_options(config, qkv_bias=bias, o_bias=bias, mlp_bias=bias, embed_dropout=config.embedding_dropout,
                           resid_dropout=config.residual_dropout, **sliding_everywhere(config))


def layer_norm(module: HFModule, options: DecoderOptions) -> nn.Module:
    """StarCoder2's norms: LayerNorm with bias."""
    return module.layer_norm(module.config.norm_epsilon)


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    make_norm = staticmethod(layer_norm)

    def make_mlp(self) -> nn.Module:
        c, o = self.config, self.options
        return FeedForward(c, self.dtype, self.param_dtype, names=("c_fc", "c_proj"), features=c.intermediate_size,
                           hidden_act=o.hidden_act, use_bias=o.mlp_bias)


class Starcoder2Model(LlamaModel):
    make_options = staticmethod(starcoder2_options)
    layer_cls_for = staticmethod(lambda config: Starcoder2DecoderLayer)
    make_norm = staticmethod(layer_norm)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    backbone_cls = Starcoder2Model


STARCODER2_SHARDING: tuple[ParamRule, ...] = (
    *(rule for rule in LLAMA_SHARDING if "mlp/" not in rule[0]),  # embeddings and attention as Llama's
    *feed_forward_rules("c_fc", "c_proj"),
)

SPEC = dataclasses.replace(
    LLAMA_SPEC, model_types=("starcoder2",), module=Starcoder2ForCausalLM, hf_architecture="Starcoder2ForCausalLM",
    sharding_rules=STARCODER2_SHARDING, peft_targets=(),  # PEFT has no default target_modules for starcoder2
    validate=checked_by_options(starcoder2_options),
)
