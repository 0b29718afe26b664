"""GPT-BigCode (`model_type` "gpt_bigcode": StarCoder 1, SantaCoder, WizardCoder, OctoCoder) in Flax Linen.

GPT-2's backbone and block (learned positions `wpe`, LayerNorms, a GELU MLP `c_fc` / `c_proj`,
an LM head tied to `wte` unless `tie_word_embeddings` is False) with its own attention, as
transformers' GPTBigCodeForCausalLM computes it:
- `c_attn` is an nn.Linear (weights stored [out, in], transposed on load like every Linear),
  not GPT-2's Conv1D;
- with `multi_query` (the default) one K/V head serves every query head: `c_attn` projects to
  [all q heads | k | v] (H + 2 D columns) and the KV cache holds that one head; without it,
  `c_attn` is laid out per head as [q | k | v] (3 H columns, GPT-NeoX's layout, not GPT-2's);
- scores scaled by 1/sqrt(D) unless `scale_attn_weights` is False.
`attention_softmax_in_fp32` and `scale_attention_softmax_in_fp32` are stored on transformers 5's
attention module and never read (its SDPA and eager paths ignore them; eager takes the softmax in
float32), and trlax's softmax is always float32: both are accepted and change nothing, as there.
Param paths are transformers': `transformer.h.{i}.attn.c_attn`, `...attn.c_proj`, `...mlp.c_fc`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array, attend, split_heads_qkv
from trlax.models.cache import CacheGeometry, KVCache
from trlax.models.decoder import CausalLM
from trlax.models.gpt2 import GPT2Block, GPT2Model
from trlax.models.layers import HFModule, activation
from trlax.models.spec import ArchitectureSpec, embedding_rules, feed_forward_rules, fused_attention_rules, tied_lm_head


def head_dim(config: Any) -> int:
    return config.n_embd // config.n_head


def num_kv_heads(config: Any) -> int:
    """KV heads `c_attn` produces and the cache holds: 1 with `multi_query`, else one per query head."""
    return 1 if config.multi_query else config.n_head


class GPTBigCodeAttention(HFModule):
    layer_idx: int = 0

    def setup(self) -> None:
        c = self.config
        self.c_attn = self.linear(c.n_embd + 2 * num_kv_heads(c) * head_dim(c))
        self.c_proj = self.linear(c.n_embd)
        self.attn_dropout = nn.Dropout(c.attn_pdrop)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, T, H] -> q [B, T, nH, D], k and v [B, T, nKV, D] from the fused `c_attn`."""
        c = self.config
        qkv = self.c_attn(x)  # [B, T, (nH + 2 nKV) D]
        b, t, _ = qkv.shape
        nh, d = c.n_head, head_dim(c)
        if c.multi_query:  # every query head, then the one k and the one v
            heads = qkv.reshape(b, t, nh + 2, d)
            return heads[:, :, :nh], heads[:, :, nh:nh + 1], heads[:, :, nh + 1:]
        return split_heads_qkv(qkv, nh)  # per head [q | k | v]

    def __call__(
        self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None, cache_index: Array
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        scale = head_dim(c) ** -0.5 if c.scale_attn_weights else 1.0
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=scale, dropout=self.attn_dropout,
                            deterministic=deterministic)
        return self.resid_dropout(self.c_proj(out.reshape(b, t, c.n_embd)), deterministic=deterministic), cache


class GPTBigCodeBlock(GPT2Block):
    """GPT-2's block around GPT-BigCode's attention (its MLP's nn.Linear weights load by the default rule)."""

    attention_cls = GPTBigCodeAttention


class GPTBigCodeModel(GPT2Model):
    block_cls = GPTBigCodeBlock


class GPTBigCodeForCausalLM(CausalLM):
    backbone_cls = GPTBigCodeModel
    backbone_name = "transformer"


def _validate(config: Any) -> None:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("gpt_bigcode with add_cross_attention=True is not supported by trlax; use a "
                                    "config without it")
    if config.n_embd % config.n_head:
        raise UnsupportedModelError(f"gpt_bigcode: n_embd={config.n_embd} is not a multiple of "
                                    f"n_head={config.n_head}; transformers refuses this config too")
    activation(config.activation_function)  # raises for an activation trlax lacks


SPEC = ArchitectureSpec(
    model_types=("gpt_bigcode",), module=GPTBigCodeForCausalLM, hf_architecture="GPTBigCodeForCausalLM",
    base_model_prefix="transformer", layer_pattern="transformer.h.{layer}",
    cache_geometry=lambda c: CacheGeometry(c.n_layer, num_kv_heads(c), head_dim(c)),
    # c_attn's columns split evenly over tp. Without multi_query the per-head [q | k | v] layout makes each
    # shard whole heads (when tp divides n_head). With it, the columns are n_head + 2 blocks of D: no
    # PartitionSpec can split the q blocks and keep the one K/V head whole on every device, so they split
    # evenly (k and v lie whole on the last shard while tp <= (n_head + 2) / 2; a query head is cut unless
    # tp divides n_head + 2) and GSPMD moves k and v to every query head's device. The KV cache's single
    # head is never split over tp (the axis does not divide 1 and is dropped).
    sharding_rules=(*embedding_rules("wte"), (r"(^|/)wpe/embedding$", (None, "embed")),
                    *fused_attention_rules("attn", "c_attn", "c_proj"), *feed_forward_rules("c_fc", "c_proj")),
    peft_targets=("c_attn",),
    tied_keys=tied_lm_head("transformer.wte.weight"),
    validate=_validate,
    max_positions=lambda c: c.n_positions, learned_positions=True,
)
