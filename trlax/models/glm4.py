"""GLM-4 (`model_type` glm: GLM-4-9B-chat; glm4: GLM-4-0414, GLM-Z1): the Llama block with Phi-3's fused MLP.

What differs from Llama, all as transformers' GlmForCausalLM / Glm4ForCausalLM compute it:
- one fused `gate_up_proj` (no bias) whose output is [gate | up]: down(up * act(gate)) (Phi-3's MLP);
- q/k/v biased per `attention_bias` (True in GLM configs), o_proj and the MLP never;
- RoPE on the first `partial_rotary_factor` of each head (0.5 in GLM configs) with interleaved pairs
  (dims 2i and 2i + 1 rotate together, by frequency i), any supported `rope_type`;
- glm4 only: two more RMSNorms per block, on the sublayer outputs before the residual add:
  h = x + post_self_attn_layernorm(attn(input_layernorm(x))),
  then h + post_mlp_layernorm(mlp(post_attention_layernorm(h))).
No sliding window. Param paths are transformers': `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`model.layers.{i}.mlp.{gate_up_proj,down_proj}`, `...{input,post_attention}_layernorm`, glm4's
`...{post_self_attn,post_mlp}_layernorm`, `model.norm`, `lm_head` when untied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from trlax.errors import UnsupportedModelError
from trlax.models import llama
from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.layers import activation
from trlax.models.phi3 import Phi3MLP
from trlax.models.rope import apply_rotary, attention_scaling, partial_inv_frequencies, rope_parameters, rotary_cos_sin
from trlax.models.self_attention import head_dim_of
from trlax.models.spec import ParamRule, feed_forward_rules


def glm_options(config: Any) -> llama.DecoderOptions:
    """DecoderOptions of a glm or glm4 config: q/k/v biases per `attention_bias`, partial rotary, no window."""
    if config.model_type not in ("glm", "glm4"):
        raise UnsupportedModelError(f"model_type {config.model_type!r} is not a GLM / GLM-4 model")
    return llama.configured_options(
        config, o_bias=False, mlp_bias=False, **llama.without_sliding(config),
        partial_rotary_factor=rope_parameters(config).get("partial_rotary_factor", 1.0))


class GlmAttention(llama.LlamaAttention):
    """Llama's attention with interleaved RoPE on the first rot_dim dims of each head."""

    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        return apply_rotary(x, cos, sin, interleaved=True)


class GlmDecoderLayer(llama.LlamaDecoderLayer):
    """GLM-4-9B-chat's block: Llama's pre-norm block with GLM's attention and the fused MLP."""

    attention_cls = GlmAttention

    def make_mlp(self) -> nn.Module:
        return Phi3MLP(config=self.config, options=self.options, dtype=self.dtype, param_dtype=self.param_dtype)


class Glm4DecoderLayer(GlmDecoderLayer):
    """GLM-4-0414's block: each sublayer's output normalised before the residual add."""

    def setup(self) -> None:
        super().setup()
        self.post_self_attn_layernorm = self.make_norm(self, self.options)
        self.post_mlp_layernorm = self.make_norm(self, self.options)

    def attention(self, x: Array, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                  cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        out, cache = super().attention(x, masks, rotary, deterministic, cache, cache_index)
        return self.post_self_attn_layernorm(out), cache

    def feed_forward(self, x: Array) -> Array:
        return self.post_mlp_layernorm(super().feed_forward(x))


class GlmModel(llama.LlamaModel):
    make_options = staticmethod(glm_options)
    layer_cls_for = staticmethod(lambda config: Glm4DecoderLayer if config.model_type == "glm4" else GlmDecoderLayer)

    def rotary(self, position_ids: Array) -> tuple[Array, Array]:
        """cos, sin [B, T, rot_dim] float32, each frequency twice in a row (transformers takes the first half of
        its cat(freqs, freqs) table and repeat-interleaves it)."""
        return rotary_cos_sin(position_ids, self.inv_freq, interleaved=True, scaling=attention_scaling(self.config))


class GlmForCausalLM(llama.LlamaForCausalLM):
    backbone_cls = GlmModel


def _validate(config: Any) -> None:
    for name in ("head_dim", "num_key_value_heads"):  # GlmConfig allows None for both
        if getattr(config, name, 0) is None:
            raise UnsupportedModelError(f"{config.model_type}: {name}=None is not supported (transformers' GLM "
                                        f"attention fails on it too); set {name} in the config")
    partial_inv_frequencies(config, head_dim_of(config))  # refuses a rope_type trlax lacks
    activation(config.hidden_act)  # raises for an activation trlax lacks
    glm_options(config)  # refuses bidirectional configs


GLM_SHARDING: tuple[ParamRule, ...] = (
    *(rule for rule in llama.LLAMA_SHARDING if "mlp/" not in rule[0]),  # embeddings and attention as Llama's
    *feed_forward_rules("gate_up_proj", "down_proj", biases=False),  # fused [gate | up]
)

SPEC = dataclasses.replace(
    llama.SPEC, model_types=("glm", "glm4"), module=GlmForCausalLM, hf_architecture="Glm4ForCausalLM",
    sharding_rules=GLM_SHARDING, peft_targets=(),  # PEFT has no default target_modules for glm / glm4
    validate=_validate,
)
