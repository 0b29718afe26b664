"""GPT-J (`model_type` "gptj") in Flax Linen, with the PyTorch module names.

Param paths match transformers' GPTJForCausalLM state dict (`transformer.wte`,
`transformer.h.{i}.ln_1`, `...attn.{q,k,v,out}_proj`, `...mlp.fc_in`, `...mlp.fc_out`,
`transformer.ln_f`, `lm_head`). What sets GPT-J apart:
- interleaved rotary embeddings ("rotate every two") on the first `rotary_dim` dims of
  each q/k head, the rest passing through; frequencies 10000 ** (-2i / rotary_dim);
- a parallel block with one layer norm: x + attn(ln_1(x)) + mlp(ln_1(x));
- an LM head with a bias (which stays its own tensor when the weight is tied to `wte`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import BackboneLayout, CausalLM, DecoderBackbone
from trlax.models.layers import FeedForward, HFModule, activation
from trlax.models.rope import apply_rotary, base_inv_frequencies, rotary_cos_sin
from trlax.models.self_attention import SelfAttention
from trlax.models.spec import ArchitectureSpec, attention_rules, embedding_rules, feed_forward_rules, tied_lm_head


def head_dim(config: Any) -> int:
    return config.n_embd // config.n_head


def rotary_inv_freq(config: Any) -> np.ndarray:
    """GPT-J's inverse frequencies [rotary_dim / 2] float32: base 10000, no scaling, whatever RoPE fields
    the config carries (transformers' GPT-J reads none of them)."""
    return base_inv_frequencies(10_000.0, config.rotary_dim)


class GPTJAttention(SelfAttention):
    out_proj_name = "out_proj"

    def setup(self) -> None:
        c = self.config
        self.k_proj = self.linear(c.n_embd, use_bias=False)
        self.v_proj = self.linear(c.n_embd, use_bias=False)
        self.q_proj = self.linear(c.n_embd, use_bias=False)
        self.out_proj = self.linear(c.n_embd, use_bias=False)
        self.attention_dropout = nn.Dropout(c.attn_pdrop)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def head_counts(self) -> tuple[int, int, int]:
        return self.config.n_head, self.config.n_head, head_dim(self.config)

    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        return apply_rotary(x, cos, sin, interleaved=True)  # the first rotary_dim dims of each head

    def project_out(self, out: Array, deterministic: bool) -> Array:
        return self.resid_dropout(self.out_proj(out), deterministic=deterministic)


class GPTJBlock(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.ln_1 = self.layer_norm(c.layer_norm_epsilon)
        self.attn = GPTJAttention(c, self.dtype, self.param_dtype, self.layer_idx)
        self.mlp = FeedForward(c, self.dtype, self.param_dtype, names=("fc_in", "fc_out"),
                               features=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
                               hidden_act=c.activation_function, dropout_rate=c.resid_pdrop)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.ln_1(x)  # one norm feeds both branches
        attn, cache = self.attn(h, masks[None], rotary, deterministic, cache, cache_index)
        return attn + self.mlp(h, deterministic) + x, cache


class GPTJModel(DecoderBackbone):
    layout = BackboneLayout(embedding="wte", stack="h", final_norm="ln_f", norm_eps="layer_norm_epsilon",
                            embedding_dropout="embd_pdrop")
    block_cls = GPTJBlock

    def rotary(self, position_ids: Array) -> tuple[Array, Array]:
        return rotary_cos_sin(position_ids, rotary_inv_freq(self.config), interleaved=True)  # [B, T, rotary_dim]


class GPTJForCausalLM(CausalLM):
    backbone_cls = GPTJModel
    backbone_name = "transformer"
    head_bias = True


def _validate(config: Any) -> None:
    rot, d = config.rotary_dim, head_dim(config)
    if not isinstance(rot, int) or not 0 < rot <= d or rot % 2:
        raise UnsupportedModelError(
            f"gptj: rotary_dim={rot} must be even and in (0, {d}] (the head dim n_embd // n_head); "
            "transformers cannot run other values either")
    activation(config.activation_function)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("gptj",), module=GPTJForCausalLM, hf_architecture="GPTJForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.n_layer, c.n_head, head_dim(c)),
    sharding_rules=(*embedding_rules("wte"), *attention_rules("attn", "q_proj", "[kv]_proj", "out_proj", biases=False),
                    *feed_forward_rules("fc_in", "fc_out"), (r"(^|/)lm_head/bias$", ("vocab",))),
    peft_targets=("q_proj", "v_proj"),
    ignored_keys=(r".*\.attn\.(bias|masked_bias)$",),  # buffers of older checkpoints; transformers skips them too
    tied_keys=tied_lm_head("transformer.wte.weight"),
    validate=_validate,
    max_positions=lambda c: c.n_positions,
)
