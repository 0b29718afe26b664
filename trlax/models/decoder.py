"""The decoder-only skeleton: a backbone (embeddings -> layer stack -> final state) and the causal-LM head.

A family subclasses `DecoderBackbone` for its `*Model` (GPT2Model, LlamaModel, ...) and
`CausalLM` for its `*ForCausalLM`; both create their submodules under the PyTorch names,
so param paths are state-dict keys. What is the same everywhere is written here once:
positions by default, the loop over the layers with their cache, the hidden states
transformers returns, the tied or untied LM head and float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.models.attention import causal_masks
from trlax.models.cache import KVCache, query_slots
from trlax.models.layers import HFModule, ReadsStoredParams
from trlax.models.outputs import CausalLMOutput
from trlax.models.stack import layer_stack

Array = jax.Array


@dataclass(frozen=True)
class BackboneLayout:
    """The HF names of a decoder backbone's parts and the config attributes that size them.

    embedding: the token embedding [V, H]; stack: the blocks' ModuleList; final_norm: the
    LayerNorm after the last block, with `norm_eps` (the config attribute of its epsilon) and
    `norm_bias`; embedding_dropout: the config attribute of the embedding dropout rate, if any;
    padding_idx: whether the token embedding is built with `padding_idx=config.pad_token_id`
    (no gradient to the pad row) as the family's transformers module builds it.
    """

    embedding: str
    final_norm: str
    stack: str = "layers"
    norm_eps: str = "layer_norm_eps"
    norm_bias: bool = True
    embedding_dropout: str | None = None
    padding_idx: bool = False


class DecoderBackbone(HFModule):
    """Embeddings -> `LayerStack` of `block_cls` -> final state, named by `layout`.

    `setup` creates the token embedding, its dropout, the blocks and the final LayerNorm, in
    PyTorch's registration order (the order TRL's layer sharing walks); a family with more parts
    (position tables, an embedding norm, RMSNorms) writes its own. Hooks, overridden where a
    family differs:

    - `embed(input_ids, position_ids, deterministic) -> x [B, T, H]`: by default the token
      embedding, then its dropout if the layout has one;
    - `layer_inputs(attention_mask [B, S], position_ids [B, T], q_slots [T]) -> dict`: the
      keyword inputs every block reads besides x and its cache; by default `masks` (one causal
      bias per distinct window of `layer_windows()`) and, when `rotary` gives a table, `rotary`;
    - `finish(x) -> x`: after the last block; by default the final norm;
    - `tied_head(h) -> logits`: the LM head that shares the input embedding (its `attend`).
    """

    layout: ClassVar[BackboneLayout]
    block_cls: ClassVar[type[nn.Module]]

    def setup(self) -> None:
        c, names = self.config, self.layout
        setattr(self, names.embedding, self.token_embedding(c.hidden_size))
        if names.embedding_dropout is not None:
            self.embedding_dropout = nn.Dropout(getattr(c, names.embedding_dropout))
        setattr(self, names.stack, layer_stack(self.block_cls, c.num_hidden_layers, names.stack, config=c,
                                               dtype=self.dtype, param_dtype=self.param_dtype))
        setattr(self, names.final_norm, self.layer_norm(getattr(c, names.norm_eps), use_bias=names.norm_bias))

    def token_embedding(self, features: int) -> nn.Module:
        """The token embedding [V, features] (with the pad row out of training where the layout says so)."""
        padding_idx = self.config.pad_token_id if self.layout.padding_idx else None
        return self.embedding(self.config.vocab_size, features, padding_idx=padding_idx)

    def embed(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        x = getattr(self, self.layout.embedding)(input_ids)  # [B, T, H]
        if self.layout.embedding_dropout is None:
            return x
        return self.embedding_dropout(x, deterministic=deterministic)

    def layer_windows(self) -> list[int | None]:
        """The sliding window of each layer (None: full attention); by default one full mask."""
        return [None]

    def rotary(self, position_ids: Array) -> Any:
        """The rotary table the blocks read for positions [B, T] (cos, sin [B, T, rot] float32), or None."""
        return None

    def layer_inputs(self, attention_mask: Array, position_ids: Array, q_slots: Array) -> dict[str, Any]:
        inputs = {"masks": causal_masks(attention_mask, q_slots, self.layer_windows())}
        rotary = self.rotary(position_ids)
        return inputs if rotary is None else {**inputs, "rotary": rotary}

    def finish(self, x: Array) -> Array:
        return getattr(self, self.layout.final_norm)(x)

    def tied_head(self, h: Array) -> Array:
        return getattr(self, self.layout.embedding).attend(h)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array,
        *,
        deterministic: bool,
        output_hidden_states: bool,
        cache: list[KVCache] | None,
        cache_index: Array,
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        """ids [B, T], mask [B, S] (S = T, or the cache's slots), positions [B, T] ->
        (final state [B, T, H'], hidden states as transformers returns them | None, new cache | None)."""
        x = self.embed(input_ids, position_ids, deterministic)
        inputs = self.layer_inputs(attention_mask, position_ids, query_slots(input_ids.shape[1], cache_index))
        x, hidden, cache = getattr(self, self.layout.stack)(
            x, cache=cache, output_hidden_states=output_hidden_states, deterministic=deterministic,
            cache_index=cache_index, **inputs)
        x = self.finish(x)
        # transformers replaces the last layer's output with the final (normed) state.
        return x, None if hidden is None else (*hidden, x), cache


class HeadBias(ReadsStoredParams, nn.Module):
    """The LM head's own bias [V] when its weight is tied to the input embedding (HF key `lm_head.bias`)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, logits: Array) -> Array:
        return logits + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
            logits.dtype)


class CausalLM(HFModule):
    """A family's `*ForCausalLM`: its backbone under `backbone_name`, and an LM head that is the
    tied input embedding or an own `head_name` Dense (with `head_bias`; a tied head keeps its bias as its
    own `head_name/bias`, as GPT-J's and Phi's do). Inputs and outputs:
    `trlax.models.outputs.CausalLMOutput`; logits are float32 whatever the compute dtype."""

    backbone_cls: ClassVar[type[HFModule]]
    backbone_name: ClassVar[str]
    head_name: ClassVar[str] = "lm_head"
    head_bias: ClassVar[bool] = False

    def setup(self) -> None:
        c = self.config
        setattr(self, self.backbone_name, self.backbone_cls(c, self.dtype, self.param_dtype))
        if not c.tie_word_embeddings:
            setattr(self, self.head_name, self.linear(c.vocab_size, use_bias=self.head_bias))
        elif self.head_bias:
            setattr(self, self.head_name, HeadBias(c.vocab_size, self.param_dtype))

    def default_positions(self, input_ids: Array, attention_mask: Array, cache_index: Array) -> Array:
        """transformers' default position_ids [B, T]: the query slots (arange from the cache index),
        whatever the padding. (OPT derives its own from the mask.)"""
        return jnp.broadcast_to(query_slots(input_ids.shape[1], cache_index), input_ids.shape)

    def logits(self, h: Array) -> Array:
        """LM-head logits [B, T, V] (compute dtype) of the final state h [B, T, H']."""
        if not self.config.tie_word_embeddings:
            return getattr(self, self.head_name)(h)
        logits = getattr(self, self.backbone_name).tied_head(h)
        return getattr(self, self.head_name)(logits) if self.head_bias else logits

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array | None = None,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> CausalLMOutput:
        cache_index = jnp.asarray(cache_index, jnp.int32)
        if position_ids is None:
            position_ids = self.default_positions(input_ids, attention_mask, cache_index)
        h, hidden, cache = getattr(self, self.backbone_name)(
            input_ids, attention_mask, position_ids, deterministic=deterministic,
            output_hidden_states=output_hidden_states, cache=cache, cache_index=cache_index)
        return CausalLMOutput(logits=self.logits(h).astype(jnp.float32), last_hidden_state=h,
                              hidden_states=hidden, cache=cache)
