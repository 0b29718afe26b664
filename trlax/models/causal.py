"""Causal LMs: forward and generation over a family's Linen module."""

from __future__ import annotations

from typing import Any

import jax

from trlax.inputs import check_labels, check_shape, mask_for, same_shape, token_ids
from trlax.models.base import FlaxPreTrainedModel
from trlax.models.loss import causal_lm_loss
from trlax.models.outputs import CausalLMOutput


class FlaxModelForCausalLM(FlaxPreTrainedModel):
    """A decoder-only LM (GPT-2, Llama, ...). Build it with `FlaxAutoModelForCausalLM`."""

    def apply(
        self,
        params: dict[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array,
        position_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_hidden_states: bool = False,
        lora: dict[str, Any] | None = None,
        labels: jax.Array | None = None,
        check_inputs: bool = False,
    ) -> CausalLMOutput:
        """The pure forward (no jit): what a jitted train step calls.

        lora: a LoRA adapter tree (`trlax.peft`) applied on top of `params`, or None
        for the base model alone. labels: [B, T] int (-100 = ignored), or None; with them
        `loss` is transformers' shifted cross-entropy [] float32. Checks (see `trlax.inputs`):
        the params' structure (at trace time under jit), token ids and positions when they
        are concrete, and, with `check_inputs=True` inside `trlax.inputs.checked`, traced ones too.
        """
        self.check_inputs(input_ids, attention_mask, position_ids, labels, traced=check_inputs)
        out = self.apply_module(params, input_ids, attention_mask, position_ids, lora=lora, train=train,
                                dropout_rng=dropout_rng, output_hidden_states=output_hidden_states)
        return out if labels is None else out.replace(loss=causal_lm_loss(out.logits, labels))

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: dict[str, Any] | None = None,
        output_hidden_states: bool = False,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        labels: Any = None,
        check_inputs: bool = False,
    ) -> CausalLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, T] int; attention_mask: [B, T] (1 = token, 0 = pad; left or right
        padding), default all ones; position_ids: [B, T], default `arange(T)` as
        transformers' PyTorch forward (pass `cumsum(mask) - 1` for left-padded batches
        if you want padding-independent positions). Returns a CausalLMOutput whose
        logits are [B, T, V] float32. The LM inside a LoRA policy applies the policy's
        adapter (when `params` is not given). labels: [B, T] int (usually the input_ids,
        -100 where nothing is scored): `loss` is then transformers' shifted LM loss. Token
        ids outside [0, vocab_size) and positions past a learned position table (GPT-2, OPT, GPT-Neo) raise InputError
        (under jit only with `check_inputs=True`, see `trlax.inputs`); so do params of
        another model.
        """
        input_ids = token_ids("input_ids", input_ids)
        mask = mask_for("attention_mask", attention_mask, input_ids)
        if position_ids is not None:
            position_ids = same_shape("position_ids", position_ids, input_ids.shape)
        if labels is not None:
            labels = same_shape("labels", token_ids("labels", labels), input_ids.shape)
        self.check_inputs(input_ids, mask, position_ids, labels, traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, position_ids,
                             dropout_rng, train=train, output_hidden_states=output_hidden_states,
                             lora=self.lora if params is None else None, labels=labels)

    def generation_prompt_length(self, input_ids: jax.Array, decoder_input_ids: Any = None,
                                 decoder_start_token_id: int | None = None) -> int:
        """The length generation_config's max_length / min_length count from: the (padded) prompt T."""
        return int(input_ids.shape[1])

    def check_inputs(self, input_ids: Any, attention_mask: Any, position_ids: Any = None, labels: Any = None, *,
                     traced: bool = False) -> None:
        """Token ids in [0, vocab_size), a mask, positions and labels (if any) of their shape, positions within
        a learned position table and labels in [0, vocab_size) or -100, else InputError.

        Concrete values are checked here; traced ones only with `traced=True` (checkify).
        """
        if labels is not None:
            check_shape("labels", labels, input_ids.shape)
            check_labels("labels", labels, self.vocab_size, traced=traced)
        self.check_token_inputs(input_ids, attention_mask, position_ids, traced=traced)
