"""Encoder-decoder LMs (T5, BART): forward and generation over a family's Linen module.

The module contract (`__call__`, `encode`, `decode`) is in `trlax.models.encoder_decoder`.
"""

from __future__ import annotations

from typing import Any

import jax

from trlax.errors import InputError
from trlax.generation import decoder_start_id, start_prepended
from trlax.inputs import (
    check_forward_flags,
    check_labels,
    check_positions,
    check_shape,
    check_token_range,
    mask_for,
    refuse_unsupported_arguments,
    token_ids,
)
from trlax.models.base import FlaxPreTrainedModel, kv_cache_argument
from trlax.models.loss import seq2seq_lm_loss, shift_tokens_right
from trlax.models.outputs import Seq2SeqLMOutput


class FlaxModelForSeq2SeqLM(FlaxPreTrainedModel):
    """An encoder-decoder LM (T5, mT5, BART). Build it with `FlaxAutoModelForSeq2SeqLM`."""

    is_encoder_decoder = True
    static_forward_arguments = (*FlaxPreTrainedModel.static_forward_arguments, "use_cache")

    def apply(
        self,
        params: dict[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_hidden_states: bool = False,
        lora: dict[str, Any] | None = None,
        labels: jax.Array | None = None,
        check_inputs: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
        lora_dropout: float = 0.0,
    ) -> Seq2SeqLMOutput:
        """The pure forward (no jit): what a jitted train step calls.

        decoder_attention_mask None means all ones (no decoder padding). lora: a LoRA
        adapter tree (`trlax.peft`) applied on top of `params`, or None for the base.
        lora_dropout: the adapter's dropout rate, as `FlaxModelForCausalLM.apply`'s.
        labels: [B, Td] int (-100 = ignored) or None; with them `loss` is transformers'
        decoder cross-entropy [] float32 (labels aligned with decoder_input_ids, unshifted).
        past_key_values: the decoder's cache of P earlier decoder tokens (see `__call__`), the
        decoder mask then [B, P + Td]; with it or `use_cache=True` the output's `cache` holds P + Td.
        Checks as `FlaxModelForCausalLM.apply` (`check_inputs`: see `trlax.inputs`).
        """
        cache, past_length = self.forward_cache(past_key_values, decoder_input_ids, use_cache)
        self.check_inputs(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels,
                          past_length=past_length, traced=check_inputs)
        if decoder_attention_mask is None:
            decoder_attention_mask = mask_for("decoder_attention_mask", None, decoder_input_ids, past_length)
        out = self.apply_module(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                lora=lora, train=train, dropout_rng=dropout_rng, lora_dropout=lora_dropout,
                                output_hidden_states=output_hidden_states, cache=cache, cache_index=past_length)
        return out if labels is None else out.replace(loss=seq2seq_lm_loss(out.logits, labels))

    def decoder_inputs(self, input_ids: jax.Array, decoder_input_ids: Any, labels: jax.Array | None) -> jax.Array:
        """decoder_input_ids [B, Td] int32 as transformers picks them: the given ones; else labels [B, Td]
        shifted right behind config.decoder_start_token_id (-100 -> config.pad_token_id); else, for BART
        (`spec.decoder_inputs_from_input_ids`), input_ids shifted so. InputError when none applies."""
        if decoder_input_ids is not None:
            return token_ids("decoder_input_ids", decoder_input_ids)
        shifted = "labels" if labels is not None else "input_ids" if self.spec.decoder_inputs_from_input_ids else None
        start = getattr(self.config, "decoder_start_token_id", None)
        if shifted is None:
            raise InputError(
                "an encoder-decoder model needs decoder_input_ids [B, Td]: pass the labels shifted right "
                f"(starting with config.decoder_start_token_id={start}), or [[{start}]] * batch for the "
                "first-step logits, or labels=... to derive them as transformers does."
            )
        pad = getattr(self.config, "pad_token_id", None)
        if start is None or pad is None:
            raise InputError(f"deriving decoder_input_ids from {shifted} needs config.decoder_start_token_id and "
                             f"config.pad_token_id (got {start}, {pad}); pass decoder_input_ids yourself")
        return shift_tokens_right(labels if labels is not None else input_ids, int(pad), int(start))

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        params: dict[str, Any] | None = None,
        output_hidden_states: bool | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        labels: Any = None,
        check_inputs: bool = False,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        cache: Any = None,
        **unsupported: Any,
    ) -> Seq2SeqLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, Te] int (encoder input); attention_mask: [B, Te] (1 = token, 0 = pad,
        either side), default all ones. decoder_input_ids: [B, Td] int; without them,
        labels [B, Td] (BART: else input_ids) are shifted right as transformers does (`decoder_inputs`);
        decoder_attention_mask: [B, Td], default all ones. labels: with them `loss` is
        transformers' LM loss over the decoder positions (-100 ignored). Returns a
        Seq2SeqLMOutput: logits [B, Td, V] float32, last_hidden_state [B, Td, H] (the
        decoder state TRL's value head reads), encoder_last_hidden_state [B, Te, H],
        and with output_hidden_states the per-layer states as transformers.
        Token ids outside [0, vocab_size), sequences longer than a learned position table
        (BART) and params of another model raise InputError (see `trlax.inputs`). The LM inside a
        LoRA policy applies the policy's adapter (when `params` is not given), with the adapter's
        `lora_dropout` when `train=True`.

        Decoder KV cache, as transformers': `use_cache=True` returns the decoder self-attention keys and
        values of the Td tokens as `out.cache` (one {"k", "v"} [B, H, Td, D] per decoder layer);
        passing them back as `cache` / `past_key_values` with the same encoder inputs and the next
        decoder tokens continues after them (decoder_attention_mask then [B, P + Td], default all ones).
        The encoder runs again and cross-attention keys and values are recomputed from its state, as
        transformers does when it is given no `encoder_outputs`; so the cache holds no cross-attention
        entries, and transformers' 4-array legacy layers are not read.
        """
        refuse_unsupported_arguments(unsupported, f"{type(self).__name__}.__call__")
        check_forward_flags(f"{type(self).__name__}.__call__", train=train, output_hidden_states=output_hidden_states)
        past_key_values = kv_cache_argument(cache, past_key_values)
        input_ids = token_ids("input_ids", input_ids)
        labels = None if labels is None else token_ids("labels", labels)
        decoder_input_ids = self.decoder_inputs(input_ids, decoder_input_ids, labels)
        past_length = self.past_length(past_key_values, decoder_input_ids.shape[0])
        mask = mask_for("attention_mask", attention_mask, input_ids)
        dmask = mask_for("decoder_attention_mask", decoder_attention_mask, decoder_input_ids, past_length)
        self.check_inputs(input_ids, mask, decoder_input_ids, dmask, labels, past_length=past_length,
                          traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, decoder_input_ids, dmask,
                             dropout_rng, train=train, lora=self.lora if params is None else None,
                             lora_dropout=self.lora_dropout if params is None else 0.0, labels=labels,
                             output_hidden_states=self.wants_hidden_states(output_hidden_states),
                             past_key_values=past_key_values, use_cache=bool(use_cache))

    def generation_prompt_length(self, input_ids: jax.Array, decoder_input_ids: Any = None,
                                 decoder_start_token_id: int | None = None) -> int:
        """The length generation_config's max_length / min_length count from: the decoder prompt
        with its start token (1 without a prompt), as transformers counts it; the start token is
        `decoder_start_token_id` (the generation settings'), else the config's."""
        if decoder_input_ids is None:
            return 1
        length = token_ids("decoder_input_ids", decoder_input_ids, self.vocab_size).shape[1]
        start = decoder_start_id(self.config, decoder_start_token_id)
        return int(length) + int(start_prepended(decoder_input_ids, start))

    def check_inputs(self, input_ids: Any, attention_mask: Any, decoder_input_ids: Any, decoder_attention_mask: Any,
                     labels: Any = None, *, past_length: int = 0, traced: bool = False) -> None:
        """Encoder and decoder ids of one batch size in [0, vocab_size), masks (None: all ones; the decoder's
        covering `past_length` cached tokens too) and labels (if any) of their ids' shapes, each sequence within
        a learned position table, and labels in [0, vocab_size) or -100; else InputError."""
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise InputError(f"decoder_input_ids has batch size {decoder_input_ids.shape[0]} but input_ids has "
                             f"{input_ids.shape[0]}; they must match")
        check_shape("attention_mask", attention_mask, input_ids.shape)
        batch, length = decoder_input_ids.shape
        check_shape("decoder_attention_mask", decoder_attention_mask, (batch, past_length + length))
        check_shape("labels", labels, decoder_input_ids.shape)
        limit = self.spec.position_limit(self.module.config)
        for name, ids, past in (("input_ids", input_ids, 0), ("decoder_input_ids", decoder_input_ids, past_length)):
            check_token_range(name, ids, self.vocab_size, traced=traced)
            check_positions(name, past + ids.shape[1], None, None, limit, model=self.config.model_type.upper(),
                            past_length=past)
        if labels is not None:
            check_labels("labels", labels, self.vocab_size, traced=traced)
