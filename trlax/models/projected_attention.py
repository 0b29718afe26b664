"""Multi-head attention with separate q/k/v/out projections, as BART, OPT and GPT-Neo have it.

The Dense layers are created in PyTorch's registration order (k_proj, v_proj, q_proj,
out_proj): TRL's order-based layer sharing walks the parameters in that order.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn

from trlax.models.attention import Array, attend
from trlax.models.cache import KVCache
from trlax.models.layers import HFModule


class ProjectedAttention(HFModule, kw_only=True):
    """`q_proj`, `k_proj`, `v_proj`, `out_proj` attention: `num_heads` heads of width `width // num_heads`.

    scale: where 1/sqrt(head_dim) is applied: "scores" (BART), "query" right after q's projection
    (OPT, kept for parity with its rounding), or "none" (GPT-Neo never scales).
    """

    width: int
    num_heads: int
    qkv_bias: bool = True
    out_bias: bool = True
    scale: Literal["scores", "query", "none"] = "scores"
    dropout_rate: float = 0.0
    zero_unseen_queries: bool = True  # False: GPT-Neo, which transformers runs in eager attention

    def setup(self) -> None:
        self.k_proj = self.linear(self.width, self.qkv_bias)
        self.v_proj = self.linear(self.width, self.qkv_bias)
        self.q_proj = self.linear(self.width, self.qkv_bias)
        self.out_proj = self.linear(self.width, self.out_bias)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, x: Array, bias: Array, deterministic: bool, cache: KVCache | None = None,
                 cache_index: Array | int = 0, kv_states: Array | None = None) -> tuple[Array, KVCache | None]:
        """x: [B, T, width] queries; kv_states: [B, S', width] (default x; the encoder state in
        cross-attention); bias: [B, 1, T, S] -> ([B, T, width], the updated cache or None)."""
        kv = x if kv_states is None else kv_states
        b, t, _ = x.shape
        head_dim = self.width // self.num_heads
        q = self.q_proj(x)
        if self.scale == "query":
            q = q * head_dim**-0.5
        q = q.reshape(b, t, self.num_heads, head_dim)
        k = self.k_proj(kv).reshape(b, kv.shape[1], self.num_heads, head_dim)
        v = self.v_proj(kv).reshape(b, kv.shape[1], self.num_heads, head_dim)
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=head_dim**-0.5 if self.scale == "scores" else 1.0,
                            dropout=self.dropout, deterministic=deterministic,
                            zero_unseen_queries=self.zero_unseen_queries)
        return self.out_proj(out.reshape(b, t, self.width)), cache
