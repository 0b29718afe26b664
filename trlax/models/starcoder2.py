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

from trlax.models.attention import Array
from trlax.models.layers import HFModule, activation
from trlax.models.llama import (
    LLAMA_SHARDING,
    DecoderOptions,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    head_dim_of,
    sliding_layers,
    validate_rope,
)
from trlax.models.llama import SPEC as LLAMA_SPEC
from trlax.models.spec import ParamRule


def starcoder2_options(config: Any) -> DecoderOptions:
    """DecoderOptions of a starcoder2 config."""
    sliding = sliding_layers(config)
    return DecoderOptions(
        head_dim=head_dim_of(config), qkv_bias=config.use_bias, o_bias=config.use_bias, mlp_bias=config.use_bias,
        hidden_act=config.hidden_act, sliding=sliding, sliding_window=config.sliding_window if any(sliding) else None,
        embed_dropout=config.embedding_dropout, resid_dropout=config.residual_dropout,
    )


def layer_norm(module: HFModule, options: DecoderOptions) -> nn.Module:
    """StarCoder2's norms: LayerNorm with bias."""
    return module.layer_norm(module.config.norm_epsilon)


class Starcoder2MLP(HFModule, kw_only=True):
    options: DecoderOptions

    def setup(self) -> None:
        c, o = self.config, self.options
        self.c_fc = self.linear(c.intermediate_size, o.mlp_bias)
        self.c_proj = self.linear(c.hidden_size, o.mlp_bias)
        self.act = activation(o.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    mlp_cls = Starcoder2MLP
    make_norm = staticmethod(layer_norm)


class Starcoder2Model(LlamaModel):
    make_options = staticmethod(starcoder2_options)
    layer_cls_for = staticmethod(lambda config: Starcoder2DecoderLayer)
    make_norm = staticmethod(layer_norm)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    backbone_cls = Starcoder2Model


def _validate(config: Any) -> None:
    validate_rope(config)
    activation(config.hidden_act)
    starcoder2_options(config)


STARCODER2_SHARDING: tuple[ParamRule, ...] = (
    *(rule for rule in LLAMA_SHARDING if "mlp/" not in rule[0]),  # embeddings and attention as Llama's
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_fc/bias$", ("mlp",)),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
)

SPEC = dataclasses.replace(
    LLAMA_SPEC, model_types=("starcoder2",), module=Starcoder2ForCausalLM, hf_architecture="Starcoder2ForCausalLM",
    sharding_rules=STARCODER2_SHARDING, peft_targets=(),  # PEFT has no default target_modules for starcoder2
    validate=_validate,
)
