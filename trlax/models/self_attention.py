"""The self-attention module the rotary and ALiBi decoder families share.

Llama (and its kin), GPT-NeoX, GPT-J, Phi, Cohere and Falcon all compute: project q, k, v;
optionally normalise each q/k head; rotate q and k by the position's cos/sin; `attend`;
project the heads back. What differs is named per family and lives in its file: the
projections' HF names (created in the family's `setup`, with an `attention_dropout`), the
fused layouts (`project_qkv`), the per-head norms (`normalize_qk`), the rotation layout
(`rotate`), the scale and soft-cap, and what follows the output projection (`project_out`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from trlax.models.attention import Array, attend
from trlax.models.cache import KVCache
from trlax.models.layers import HFModule
from trlax.models.rope import apply_rotary


def head_dim_of(config: Any) -> int:
    """The head dim: `config.head_dim` where the config sets one, else hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class SelfAttention(HFModule):
    """`__call__(x [B, T, H], bias [B, 1 | Hq, T, S], rotary (cos, sin [B, T, rot]) | None, deterministic,
    cache, cache_index) -> ([B, T, H], the updated cache or None)`.

    A subclass's `setup` creates the projections and `attention_dropout`; by default q, k, v
    come from `q_proj`, `k_proj`, `v_proj` and the output goes through `out_proj_name`.
    """

    layer_idx: int = 0
    out_proj_name: ClassVar[str] = "o_proj"

    def head_counts(self) -> tuple[int, int, int]:
        """(query heads Hq, KV heads Hkv, head dim D)."""
        c = self.config
        return c.num_attention_heads, c.num_key_value_heads, head_dim_of(c)

    def project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, T, H] -> q [B, T, Hq, D], k and v [B, T, Hkv, D] from separate projections."""
        b, t, _ = x.shape
        hq, hkv, d = self.head_counts()
        return (self.q_proj(x).reshape(b, t, hq, d), self.k_proj(x).reshape(b, t, hkv, d),
                self.v_proj(x).reshape(b, t, hkv, d))

    def normalize_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        """Per-head q/k norms before the rotation (Qwen3, Gemma 3, Cohere, Phi); none by default."""
        return q, k

    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        """RoPE on q or k [B, T, Hq | Hkv, D]; HF's rotate-half layout by default."""
        return apply_rotary(x, cos, sin)

    def scale(self) -> float:
        return self.head_counts()[2] ** -0.5

    def softcap(self) -> float | None:
        return None

    def zero_unseen_queries(self) -> bool:
        """Whether a query that sees no key outputs zeros (transformers' default SDPA attention), not the
        values' average (its eager attention, which a few families run): see `dot_product_attention`."""
        return True

    def project_out(self, out: Array, deterministic: bool) -> Array:
        """The heads [B, T, Hq * D] -> [B, T, H] through the output projection."""
        return getattr(self, self.out_proj_name)(out)

    def __call__(
        self, x: Array, bias: Array, rotary: tuple[Array, Array] | None, deterministic: bool,
        cache: KVCache | None, cache_index: Array,
    ) -> tuple[Array, KVCache | None]:
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = self.normalize_qk(q, k)
        if rotary is not None:
            q, k = self.rotate(q, *rotary), self.rotate(k, *rotary)
        out, cache = attend(q, k, v, bias, cache, cache_index, scale=self.scale(), dropout=self.attention_dropout,
                            deterministic=deterministic, softcap=self.softcap(),
                            zero_unseen_queries=self.zero_unseen_queries())
        return self.project_out(out.reshape(b, t, -1), deterministic), cache
