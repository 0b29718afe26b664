"""OPT (`model_type` "opt") in Flax Linen, with the PyTorch module names.

Param paths match transformers' OPTForCausalLM state dict (`model.decoder.embed_tokens`,
`model.decoder.layers.{i}.self_attn.q_proj`, ...). What sets OPT apart:
- learned positions with an offset of 2, derived from the attention mask (a left-padded
  row starts at position 0 at its first real token; pads sit at -1, i.e. row 1);
- `do_layer_norm_before=False` (OPT-350m) puts the layer norms after each residual add and
  drops the decoder's final layer norm (as does `_remove_final_layer_norm`);
- `word_embed_proj_dim != hidden_size` adds `project_in` / `project_out`: the token
  embeddings and the LM head live in the smaller space, so the head (and TRL's value head)
  read the state after `project_out`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.projected_attention import ProjectedAttention
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules, tied_lm_head
from trlax.models.stack import layer_stack

POSITION_OFFSET = 2  # OPT's learned position table has 2 extra leading rows (a fairseq legacy)


def default_position_ids(attention_mask: Array, seq_len: int, cache_index: Array) -> Array:
    """transformers' OPT positions when position_ids=None: [B, T] int32.

    `cumsum(mask) * mask - 1` over all S mask slots (pads get -1), then the T slots from
    `cache_index` on: the same as HF slicing `[:, past_seen_tokens:]` of its [B, past + T] mask.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=1) * mask - 1  # [B, S]
    return jax.lax.dynamic_slice_in_dim(positions, cache_index, seq_len, axis=1)  # [B, T]


def opt_layer_norm(module: HFModule) -> nn.LayerNorm:
    """torch.nn.LayerNorm's default eps (OPT does not configure it; flax's default is 1e-6)."""
    affine = module.config.layer_norm_elementwise_affine
    return module.layer_norm(1e-5, use_bias=affine, use_scale=affine)


def projects(config: Any) -> bool:
    """OPT-350m embeds (and reads out) in a smaller space than its hidden size: project_in / project_out."""
    return config.word_embed_proj_dim != config.hidden_size


def final_norm(config: Any) -> bool:
    return config.do_layer_norm_before and not config._remove_final_layer_norm


class OPTDecoderLayer(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.self_attn = ProjectedAttention(c, self.dtype, self.param_dtype, width=c.hidden_size,
                                            num_heads=c.num_attention_heads, qkv_bias=c.enable_bias,
                                            out_bias=c.enable_bias, scale="query", dropout_rate=c.attention_dropout)
        self.self_attn_layer_norm = opt_layer_norm(self)
        self.fc1 = self.linear(c.ffn_dim, c.enable_bias)
        self.fc2 = self.linear(c.hidden_size, c.enable_bias)
        self.final_layer_norm = opt_layer_norm(self)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.dropout)

    def __call__(self, x: Array, *, masks: dict[Any, Array], deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        pre_ln = self.config.do_layer_norm_before  # False for OPT-350m: norms after the residual adds
        h = self.self_attn_layer_norm(x) if pre_ln else x
        h, cache = self.self_attn(h, masks[None], deterministic, cache, cache_index)
        x = x + self.dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if pre_ln else x
        x = x + self.dropout(self.fc2(self.act(self.fc1(h))), deterministic=deterministic)
        return (x if pre_ln else self.final_layer_norm(x)), cache


class OPTDecoder(DecoderBackbone):
    layout = BackboneLayout(embedding="embed_tokens", final_norm="final_layer_norm", padding_idx=True)

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = self.token_embedding(c.word_embed_proj_dim)
        self.embed_positions = self.embedding(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size)
        if projects(c):
            self.project_out = self.linear(c.word_embed_proj_dim, use_bias=False)  # PyTorch's order
            self.project_in = self.linear(c.hidden_size, use_bias=False)
        if final_norm(c):
            self.final_layer_norm = opt_layer_norm(self)
        self.layers = layer_stack(OPTDecoderLayer, c.num_hidden_layers, "layers", config=c, dtype=self.dtype,
                                  param_dtype=self.param_dtype)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        x = self.embed_tokens(input_ids)  # [B, T, Wp]
        if projects(self.config):
            x = self.project_in(x)  # [B, T, H]
        # transformers' OPT applies no dropout to the embeddings.
        return x + self.embed_positions(position_ids + POSITION_OFFSET)

    def finish(self, x: Array) -> Array:
        if final_norm(self.config):
            x = self.final_layer_norm(x)
        return self.project_out(x) if projects(self.config) else x  # [B, T, Wp]


class OPTModel(HFModule):
    """transformers' wrapper module; it only exists so param paths read `model.decoder...`."""

    def setup(self) -> None:
        self.decoder = OPTDecoder(self.config, self.dtype, self.param_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        return self.decoder(*args, **kwargs)

    def tied_head(self, h: Array) -> Array:
        return self.decoder.tied_head(h)


class OPTForCausalLM(CausalLM):
    backbone_cls = OPTModel
    backbone_name = "model"

    def default_positions(self, input_ids: Array, attention_mask: Array, cache_index: Array) -> Array:
        """transformers' OPT default: count real tokens in the mask."""
        return default_position_ids(attention_mask, input_ids.shape[1], cache_index)


def _validate(config: Any) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedModelError(
            f"OPT hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{config.num_attention_heads}; transformers refuses this config too"
        )
    if config.layerdrop:
        raise UnsupportedModelError(
            f"OPT layerdrop={config.layerdrop} (randomly skipping layers in training) is not supported "
            "by trlax; set config.layerdrop = 0.0"
        )
    activation(config.activation_function)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("opt",), module=OPTForCausalLM, hf_architecture="OPTForCausalLM", base_model_prefix="model",
    layer_pattern="model.decoder.layers.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.num_hidden_layers, c.num_attention_heads,
                                           c.hidden_size // c.num_attention_heads),
    sharding_rules=(*embedding_rules("embed_tokens"), (r"(^|/)embed_positions/embedding$", (None, "embed")),
                    *attention_rules("self_attn", "q_proj", "[kv]_proj", "out_proj"),
                    *feed_forward_rules("fc1", "fc2", scope="(^|/)")),
    peft_targets=("q_proj", "v_proj"), tied_keys=tied_lm_head("model.decoder.embed_tokens.weight"),
    validate=_validate, learned_positions=True,
)
