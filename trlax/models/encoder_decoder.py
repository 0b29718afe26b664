"""The encoder-decoder skeleton (T5, BART): the stacks' shared loop and the `encode` / `decode` shell.

A seq2seq family module has three methods (`trlax.generation` and the value-head wrapper
code against them):

- `__call__(input_ids [B, Te], attention_mask [B, Te], decoder_input_ids [B, Td],
  decoder_attention_mask [B, S], *, deterministic, output_hidden_states, cache, cache_index)
  -> Seq2SeqLMOutput`: `encode`, then `decode`
- `encode(input_ids, attention_mask, *, deterministic, output_hidden_states)
  -> (encoder_last_hidden_state [B, Te, H], encoder_hidden_states | None)`
- `decode(decoder_input_ids [B, T], decoder_attention_mask [B, S], encoder_last_hidden_state,
  encoder_attention_mask [B, Te], *, deterministic, output_hidden_states, cache, cache_index)
  -> Seq2SeqLMOutput`; with a cache the decoder mask covers its S slots and the T queries
  sit in slots cache_index..cache_index+T-1 (as for causal LMs). The cache is the decoder
  self-attention {"k", "v"} per layer (`SPEC.init_cache`); cross-attention keys and values
  are recomputed from the encoder state on every call, so the cache does not depend on Te.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from trlax.models.attention import Array, attention_bias
from trlax.models.cache import KVCache, query_slots
from trlax.models.layers import HFModule
from trlax.models.outputs import Seq2SeqLMOutput


class EncoderDecoderStack(HFModule, kw_only=True):
    """An encoder or a decoder (T5Stack, BartEncoder/BartDecoder) without its token embedding, which
    the LM shares. A family's subclass creates its `layer_stack(...)` under `stack_name` and implements:

    - `prepare(embeds, q_slots, deterministic) -> x`: before the first block (positions, norm, dropout);
    - `layer_inputs(mask [B, S], encoder_mask [B, Te] | None, q_slots [T]) -> dict`: the keyword
      inputs every block reads; by default `self_bias` [B, 1, T, S] (causal in the decoder) and, in the
      decoder, `cross_bias` [B, 1, T, Te] (else None);
    - `finish(x, deterministic) -> x`: after the last block; by default x itself.
    Its blocks are called as `block(x, cache=..., encoder_states=..., deterministic=..., cache_index=..., **inputs)`.
    """

    is_decoder: bool
    stack_name: ClassVar[str] = "layers"

    def prepare(self, embeds: Array, q_slots: Array, deterministic: bool) -> Array:
        raise NotImplementedError

    def layer_inputs(self, mask: Array, encoder_mask: Array | None, q_slots: Array) -> dict[str, Any]:
        self_bias = attention_bias(mask, q_slots, causal=self.is_decoder)  # [B, 1, T, S]
        cross_bias = attention_bias(encoder_mask, q_slots, causal=False) if self.is_decoder else None  # [B,1,T,Te]
        return {"self_bias": self_bias, "cross_bias": cross_bias}

    def finish(self, x: Array, deterministic: bool) -> Array:
        return x

    def __call__(
        self,
        embeds: Array,
        mask: Array,
        encoder_states: Array | None,
        encoder_mask: Array | None,
        *,
        deterministic: bool,
        output_hidden_states: bool,
        cache: list[KVCache] | None,
        cache_index: Array,
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        """embeds: [B, T, H]; mask: [B, S] over the (cache) key slots; encoder_*: the decoder's cross inputs."""
        q_slots = query_slots(embeds.shape[1], cache_index)  # [T]
        x = self.prepare(embeds, q_slots, deterministic)
        inputs = self.layer_inputs(mask, encoder_mask, q_slots)
        x, hidden, cache = getattr(self, self.stack_name)(
            x, cache=cache, output_hidden_states=output_hidden_states, encoder_states=encoder_states,
            deterministic=deterministic, cache_index=cache_index, **inputs)
        x = self.finish(x, deterministic)
        return x, None if hidden is None else (*hidden, x), cache


class EncoderDecoderLM(HFModule):
    """A family's `*ForConditionalGeneration`. Subclasses implement `embed_tokens(ids) -> [B, T, H]`
    (the shared embedding), `stacks() -> (encoder, decoder)` and `lm_logits(h) -> [B, T, V]`."""

    def embed_tokens(self, ids: Array) -> Array:
        raise NotImplementedError

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def lm_logits(self, h: Array) -> Array:
        raise NotImplementedError

    def encode(
        self, input_ids: Array, attention_mask: Array, *, deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array, tuple[Array, ...] | None]:
        """Encoder: ids [B, Te], mask [B, Te] -> (last hidden state [B, Te, H], hidden states | None)."""
        h, hidden, _ = self.stacks()[0](self.embed_tokens(input_ids), attention_mask, None, None,
                                        deterministic=deterministic, output_hidden_states=output_hidden_states,
                                        cache=None, cache_index=jnp.zeros((), jnp.int32))
        return h, hidden

    def decode(
        self,
        decoder_input_ids: Array,
        decoder_attention_mask: Array,
        encoder_last_hidden_state: Array,
        encoder_attention_mask: Array,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> Seq2SeqLMOutput:
        """Decoder + LM head: ids [B, T], mask [B, S] (S = T without a cache) -> Seq2SeqLMOutput."""
        h, hidden, cache = self.stacks()[1](
            self.embed_tokens(decoder_input_ids), decoder_attention_mask, encoder_last_hidden_state,
            encoder_attention_mask, deterministic=deterministic, output_hidden_states=output_hidden_states,
            cache=cache, cache_index=jnp.asarray(cache_index, jnp.int32))
        return Seq2SeqLMOutput(logits=self.lm_logits(h).astype(jnp.float32), last_hidden_state=h,
                               encoder_last_hidden_state=encoder_last_hidden_state,
                               decoder_hidden_states=hidden, cache=cache)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        decoder_input_ids: Array,
        decoder_attention_mask: Array,
        *,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        cache: list[KVCache] | None = None,
        cache_index: Array | int = 0,
    ) -> Seq2SeqLMOutput:
        enc, enc_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic,
                                      output_hidden_states=output_hidden_states)
        out = self.decode(decoder_input_ids, decoder_attention_mask, enc, attention_mask,
                          deterministic=deterministic, output_hidden_states=output_hidden_states, cache=cache,
                          cache_index=cache_index)
        return out.replace(encoder_hidden_states=enc_hidden)
