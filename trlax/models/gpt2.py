"""GPT-2 (`model_type` "gpt2") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPT2LMHeadModel state dict: `transformer.wte`,
`transformer.wpe`, `transformer.h.{i}.attn.c_attn`, ..., `transformer.ln_f`. Conv1D
weights are stored as in PyTorch ([in, out]), so they load without a transpose. The LM
head is tied to `wte` unless `tie_word_embeddings` is False (then `lm_head.weight`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, attend
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.spec import ArchitectureSpec, embedding_rules, feed_forward_rules, fused_attention_rules, tied_lm_head
from trlax.models.stack import layer_stack


class GPT2Attention(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.c_attn = self.linear(3 * c.n_embd)  # fused q | k | v, a Conv1D: kernel [in, out] as stored
        self.c_proj = self.linear(c.n_embd)
        self.attn_dropout = nn.Dropout(c.attn_pdrop)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        head_dim = c.n_embd // c.n_head
        q, k, v = (y.reshape(b, t, c.n_head, head_dim) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        scale = 1.0 / head_dim**0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=scale, dropout=self.attn_dropout,
                            deterministic=deterministic)
        return self.resid_dropout(self.c_proj(out.reshape(b, t, c.n_embd)), deterministic=deterministic), cache


class GPT2Block(HFModule):
    """ln_1 -> attn -> residual, ln_2 -> mlp -> residual (GPT-BigCode swaps `attention_cls`; GPT-Neo its own
    modules and `window`)."""

    layer_idx: int = 0
    attention_cls: ClassVar[type[nn.Module]] = GPT2Attention

    def setup(self) -> None:
        c = self.config
        self.ln_1 = self.layer_norm(c.layer_norm_epsilon)
        self.attn = self.attention_cls(c, self.dtype, self.param_dtype, self.layer_idx)
        self.ln_2 = self.layer_norm(c.layer_norm_epsilon)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("c_fc", "c_proj"),
                               features=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
                               hidden_act=c.activation_function, dropout_rate=c.resid_pdrop)

    def window(self) -> int | None:
        """This layer's sliding window (None: full attention), which picks its mask."""
        return None

    def __call__(self, x: Array, *, masks: dict[Any, Array], deterministic: bool, cache: KVCache | None,
                 cache_index: Array) -> tuple[Array, KVCache | None]:
        attn_out, cache = self.attn(self.ln_1(x), masks[self.window()], deterministic, cache, cache_index)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x), deterministic), cache


class GPT2Model(DecoderBackbone):
    """Token + learned position embeddings, dropout, the blocks, `ln_f`; GPT-Neo's backbone too."""

    layout = BackboneLayout(embedding="wte", stack="h", final_norm="ln_f", norm_eps="layer_norm_epsilon",
                            embedding_dropout="embd_pdrop")
    block_cls = GPT2Block

    def setup(self) -> None:
        c = self.config
        self.wte = self.embedding(c.vocab_size, c.hidden_size)
        self.wpe = self.embedding(c.max_position_embeddings, c.hidden_size)
        self.embedding_dropout = nn.Dropout(float(getattr(c, self.layout.embedding_dropout)))
        self.h = layer_stack(self.block_cls, c.num_hidden_layers, "h", config=c, dtype=self.dtype,
                             param_dtype=self.param_dtype)
        self.ln_f = self.layer_norm(c.layer_norm_epsilon)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.embedding_dropout(self.wte(input_ids) + self.wpe(position_ids), deterministic=deterministic)


class GPT2LMHeadModel(CausalLM):
    backbone_cls = GPT2Model
    backbone_name = "transformer"


def _validate(config: Any) -> None:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            "GPT-2 with add_cross_attention=True is not supported by trlax; use a config without it.")
    activation(config.activation_function)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("gpt2",), module=GPT2LMHeadModel, hf_architecture="GPT2LMHeadModel",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.n_layer, c.n_head, c.n_embd // c.n_head),
    sharding_rules=(*embedding_rules("wte"), (r"(^|/)wpe/embedding$", (None, "embed")),
                    *fused_attention_rules("attn", "c_attn", "c_proj"), *feed_forward_rules("c_fc", "c_proj")),
    peft_targets=("c_attn",),
    keep_layout=(r".*\.(c_attn|c_proj|c_fc)\.weight$",),
    ignored_keys=(r".*\.attn\.(bias|masked_bias)$",),
    tied_keys=tied_lm_head("transformer.wte.weight"),
    validate=_validate,
    max_positions=lambda c: c.n_positions, learned_positions=True,
)
