"""Encoder-decoder LMs (T5, BART): forward and generation over a family's Linen module.

The module contract (`__call__`, `encode`, `decode`) is in `trlax.models.encoder_decoder`.
"""

from __future__ import annotations

from typing import Any

import jax

from trlax.generation import GenerateOutput, generate
from trlax.inputs import InputError, check_positions, check_token_range, mask_for, token_ids
from trlax.models.base import FlaxPreTrainedModel
from trlax.models.outputs import Seq2SeqLMOutput


class FlaxModelForSeq2SeqLM(FlaxPreTrainedModel):
    """An encoder-decoder LM (T5, mT5, BART). Build it with `FlaxAutoModelForSeq2SeqLM`."""

    is_encoder_decoder = True

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
        check_inputs: bool = False,
    ) -> Seq2SeqLMOutput:
        """The pure forward (no jit): what a jitted train step calls.

        decoder_attention_mask None means all ones (no decoder padding). lora: a LoRA
        adapter tree (`trlax.peft`) applied on top of `params`, or None for the base.
        Checks as `FlaxModelForCausalLM.apply` (`check_inputs`: see `trlax.inputs`).
        """
        self.check_inputs(input_ids, decoder_input_ids, traced=check_inputs)
        if decoder_attention_mask is None:
            decoder_attention_mask = mask_for("decoder_attention_mask", None, decoder_input_ids)
        return self.apply_module(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                 lora=lora, train=train, dropout_rng=dropout_rng,
                                 output_hidden_states=output_hidden_states)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        params: dict[str, Any] | None = None,
        output_hidden_states: bool = False,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        check_inputs: bool = False,
    ) -> Seq2SeqLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, Te] int (encoder input); attention_mask: [B, Te] (1 = token, 0 = pad,
        either side), default all ones. decoder_input_ids: [B, Td] int, required (unlike
        transformers, no labels are shifted here); decoder_attention_mask: [B, Td], default
        all ones. Returns a Seq2SeqLMOutput: logits [B, Td, V] float32, last_hidden_state
        [B, Td, H] (the decoder state TRL's value head reads), encoder_last_hidden_state
        [B, Te, H], and with output_hidden_states the per-layer states as transformers.
        Token ids outside [0, vocab_size), sequences longer than a learned position table
        (BART) and params of another model raise InputError (see `trlax.inputs`).
        """
        input_ids = token_ids("input_ids", input_ids)
        if decoder_input_ids is None:
            start = getattr(self.config, "decoder_start_token_id", None)
            raise InputError(
                "an encoder-decoder model needs decoder_input_ids [B, Td]: pass the labels shifted right "
                f"(starting with config.decoder_start_token_id={start}), or [[{start}]] * batch for the "
                "first-step logits; trlax does not derive them from input_ids or labels."
            )
        decoder_input_ids = token_ids("decoder_input_ids", decoder_input_ids)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise InputError(f"decoder_input_ids has batch size {decoder_input_ids.shape[0]} but input_ids has "
                             f"{input_ids.shape[0]}; they must match")
        mask = mask_for("attention_mask", attention_mask, input_ids)
        dmask = mask_for("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
        self.check_inputs(input_ids, decoder_input_ids, traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, decoder_input_ids, dmask,
                             dropout_rng, train=train, output_hidden_states=output_hidden_states,
                             lora=self.lora if params is None else None)

    def check_inputs(self, input_ids: Any, decoder_input_ids: Any, *, traced: bool = False) -> None:
        """Encoder and decoder ids in [0, vocab_size), each sequence within a learned position table."""
        limit = self.spec.position_limit(self.config)
        for name, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            check_token_range(name, ids, self.vocab_size, traced=traced)
            check_positions(name, ids.shape[1], None, None, limit, model=self.config.model_type.upper())

    def generate(self, input_ids: Any, attention_mask: Any = None, *, params: dict[str, Any] | None = None,
                 lora: dict[str, Any] | None = None, **kwargs: Any) -> GenerateOutput:
        """Jit-compiled generation with a KV cache; see `trlax.generation.generate`."""
        if params is None and lora is None:
            lora = self.lora
        return generate(self, input_ids, attention_mask, params=params, lora=lora, **kwargs)
