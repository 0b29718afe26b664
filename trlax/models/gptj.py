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
import jax.numpy as jnp
import numpy as np

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, attend, causal_masks
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM, DecoderBackbone
from trlax.models.layers import HFModule, activation
from trlax.models.rope import apply_rotary_interleaved, inv_frequencies, rotary_cos_sin_interleaved
from trlax.models.spec import ArchitectureSpec, tied_lm_head
from trlax.models.stack import layer_stack


def head_dim(config: Any) -> int:
    return config.n_embd // config.n_head


def rotary_inv_freq(config: Any) -> np.ndarray:
    """GPT-J's inverse frequencies [rotary_dim / 2] float32: base 10000, no scaling."""
    return inv_frequencies(config, config.rotary_dim)


class GPTJAttention(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.k_proj = self.linear(c.n_embd, use_bias=False)
        self.v_proj = self.linear(c.n_embd, use_bias=False)
        self.q_proj = self.linear(c.n_embd, use_bias=False)
        self.out_proj = self.linear(c.n_embd, use_bias=False)
        self.attn_dropout = nn.Dropout(c.attn_pdrop)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def __call__(
        self, x: Array, bias: Array, rotary: tuple[Array, Array], deterministic: bool, cache: KVCache | None,
        cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        d = head_dim(c)
        q, k, v = (proj(x).reshape(b, t, c.n_head, d) for proj in (self.q_proj, self.k_proj, self.v_proj))
        rot = rotary[0].shape[-1]
        q = jnp.concatenate([apply_rotary_interleaved(q[..., :rot], *rotary), q[..., rot:]], axis=-1)
        k = jnp.concatenate([apply_rotary_interleaved(k[..., :rot], *rotary), k[..., rot:]], axis=-1)
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=d**-0.5, dropout=self.attn_dropout,
                            deterministic=deterministic)
        out = self.out_proj(out.reshape(b, t, c.n_embd))
        return self.resid_dropout(out, deterministic=deterministic), cache


class GPTJMLP(HFModule):
    def setup(self) -> None:
        c = self.config
        self.fc_in = self.linear(c.n_inner if c.n_inner is not None else 4 * c.n_embd)
        self.fc_out = self.linear(c.n_embd)
        self.act = activation(c.activation_function)
        self.dropout = nn.Dropout(c.resid_pdrop)

    def __call__(self, x: Array, deterministic: bool) -> Array:
        return self.dropout(self.fc_out(self.act(self.fc_in(x))), deterministic=deterministic)


class GPTJBlock(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.ln_1 = self.layer_norm(c.layer_norm_epsilon)
        self.attn = GPTJAttention(c, self.dtype, self.param_dtype, self.layer_idx)
        self.mlp = GPTJMLP(c, self.dtype, self.param_dtype)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        h = self.ln_1(x)  # one norm feeds both branches
        attn, cache = self.attn(h, masks[None], rotary, deterministic, cache, cache_index)
        return attn + self.mlp(h, deterministic) + x, cache


class GPTJModel(DecoderBackbone):
    embedding_name = "wte"
    final_norm_name = "ln_f"

    stack_name = "h"

    def setup(self) -> None:
        c = self.config
        self.wte = self.embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = layer_stack(GPTJBlock, c.n_layer, "h", config=c, dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_f = self.layer_norm(c.layer_norm_epsilon)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        return self.drop(self.wte(input_ids), deterministic=deterministic)  # [B, T, H]

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        return {"masks": causal_masks(attention_mask, q_slots, [None]),
                "rotary": rotary_cos_sin_interleaved(position_ids, rotary_inv_freq(self.config))}  # [B, T, rot]


class HeadBias(nn.Module):
    """The LM head's own bias [V] when its weight is tied to `wte` (HF key `lm_head.bias`)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, logits: Array) -> Array:
        return logits + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
            logits.dtype)


class GPTJForCausalLM(CausalLM):
    backbone_cls = GPTJModel
    backbone_name = "transformer"
    head_bias = True

    def setup(self) -> None:
        super().setup()
        if self.config.tie_word_embeddings:
            self.lm_head = HeadBias(self.config.vocab_size, self.param_dtype)

    def logits(self, h: Array) -> Array:
        if self.config.tie_word_embeddings:
            return self.lm_head(self.transformer.tied_head(h))
        return self.lm_head(h)


def _validate(config: Any) -> None:
    rot, d = config.rotary_dim, head_dim(config)
    if not 0 < rot <= d or rot % 2:
        raise UnsupportedModelError(
            f"gptj: rotary_dim={rot} must be even and in (0, {d}] (the head dim n_embd // n_head); "
            "transformers cannot run other values either")
    rotary_inv_freq(config)  # raises UnsupportedModelError for RoPE scaling GPT-J does not have
    activation(config.activation_function)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("gptj",), module=GPTJForCausalLM, hf_architecture="GPTJForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}", num_layers=lambda c: c.n_layer,
    cache_geometry=lambda c: CacheGeometry(c.n_layer, c.n_head, head_dim(c)),
    sharding_rules=(
        (r"(^|/)wte/embedding$", ("vocab", "embed")),
        (r"attn/[qkv]_proj/kernel$", ("embed", "heads")),
        (r"attn/out_proj/kernel$", ("heads", "embed")),
        (r"mlp/fc_in/kernel$", ("embed", "mlp")),
        (r"mlp/fc_in/bias$", ("mlp",)),
        (r"mlp/fc_out/kernel$", ("mlp", "embed")),
        (r"(^|/)lm_head/bias$", ("vocab",)),
    ),
    peft_targets=("q_proj", "v_proj"),
    ignored_keys=(r".*\.attn\.(bias|masked_bias)$",),  # buffers of older checkpoints; transformers skips them too
    tied_keys=tied_lm_head,
    validate=_validate,
    max_positions=lambda c: c.n_positions,
)
