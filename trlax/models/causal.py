"""Causal LMs: forward and generation over a family's Linen module."""

from __future__ import annotations

from typing import Any

import jax

from trlax.inputs import (
    check_forward_flags,
    check_labels,
    check_shape,
    mask_for,
    refuse_unsupported_arguments,
    same_shape,
    token_ids,
)
from trlax.models.base import FlaxPreTrainedModel, kv_cache_argument
from trlax.models.loss import causal_lm_loss
from trlax.models.outputs import CausalLMOutput


class FlaxModelForCausalLM(FlaxPreTrainedModel):
    """A decoder-only LM (GPT-2, Llama, ...). Build it with `FlaxAutoModelForCausalLM`."""

    static_forward_arguments = (*FlaxPreTrainedModel.static_forward_arguments, "use_cache")

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
        past_key_values: Any = None,
        use_cache: bool = False,
        lora_dropout: float = 0.0,
    ) -> CausalLMOutput:
        """The pure forward (no jit): what a jitted train step calls.

        lora: a LoRA adapter tree (`trlax.peft`) applied on top of `params`, or None
        for the base model alone. lora_dropout: PEFT's dropout rate in [0, 1) on the input of the
        adapter's LoRA branches, applied only with `train=True` (a Python float: a traced program
        per value; 0 traces none). labels: [B, T] int (-100 = ignored), or None; with them
        `loss` is transformers' shifted cross-entropy [] float32. past_key_values: the cache of
        P earlier tokens (see `__call__`), attention_mask then [B, P + T]; with it or with
        `use_cache=True` the output's `past_key_values` holds the P + T tokens. A mixture of experts with
        `config.output_router_logits` also returns transformers' `aux_loss` and `router_logits` (its aux loss counts
        the T new tokens' mask) and adds `router_aux_loss_coef` x `aux_loss` to the loss. Checks (see
        `trlax.inputs`): the params' structure (at trace time under jit), token ids and positions
        when they are concrete, and, with `check_inputs=True` inside `trlax.inputs.checked`, traced ones too.
        """
        cache, past_length = self.forward_cache(past_key_values, input_ids, use_cache)
        self.check_inputs(input_ids, attention_mask, position_ids, labels, past_length=past_length,
                          traced=check_inputs)
        router = self.spec.router_outputs if getattr(self.config, "output_router_logits", False) else None
        out = self.apply_module(params, input_ids, attention_mask, position_ids, lora=lora, train=train,
                                dropout_rng=dropout_rng, lora_dropout=lora_dropout,
                                output_hidden_states=output_hidden_states, cache=cache,
                                cache_index=past_length, **({"mutable": ["intermediates"]} if router else {}))
        routed = None
        if router is not None:
            out, state = out
            # the module's config: router_aux_loss_coef is read when the model is built, as transformers reads it
            routed = router(self.module.config, state["intermediates"], attention_mask[:, past_length:])
            out = out.replace(aux_loss=routed.aux_loss, router_logits=routed.router_logits)
        if labels is None:
            return out
        loss = causal_lm_loss(out.logits, labels)
        return out.replace(loss=loss if routed is None else loss + routed.coefficient * routed.aux_loss)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
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
    ) -> CausalLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, T] int; attention_mask: [B, T] (1 = token, 0 = pad; left or right
        padding), default all ones; position_ids: [B, T], default `arange(T)` as
        transformers' PyTorch forward (pass `cumsum(mask) - 1` for left-padded batches
        if you want padding-independent positions). Returns a CausalLMOutput whose
        logits are [B, T, V] float32; output_hidden_states None: `config.output_hidden_states`. The LM
        inside a LoRA policy applies the policy's adapter (when `params` is not given), with the adapter's
        `lora_dropout` when `train=True`. labels: [B, T] int
        (usually the input_ids, -100 where nothing is scored): `loss` is then transformers' shifted LM loss. Token
        ids outside [0, vocab_size) and positions past a learned position table (GPT-2, OPT, GPT-Neo) raise InputError
        (under jit only with `check_inputs=True`, see `trlax.inputs`); so do params of
        another model.

        KV cache, as transformers': `use_cache=True` returns the keys and values of the T tokens as
        `out.cache` (also `out.past_key_values`; one {"k", "v"} [B, Hkv, T, D] per layer, compute dtype);
        passing them back as `cache` (transformers 5.25's name) or `past_key_values` (TRL's and older
        transformers') with the next tokens [B, T'] continues after them (attention_mask then [B, T + T'],
        default all ones; positions by default T, T + 1, ..., OPT's from the mask) and returns the cache of
        all T + T' tokens, in the compute dtype whatever the dtype passed in. transformers' legacy ((k, v), ...)
        of such JAX or numpy arrays is accepted too (not torch tensors or transformers' Cache objects: see
        `trlax.models.cache.past_kv_length`). Every new cache length compiles a new program: decode with
        `generate`.
        """
        refuse_unsupported_arguments(unsupported, f"{type(self).__name__}.__call__")
        check_forward_flags(f"{type(self).__name__}.__call__", train=train, output_hidden_states=output_hidden_states)
        past_key_values = kv_cache_argument(cache, past_key_values)
        input_ids = token_ids("input_ids", input_ids)
        past_length = self.past_length(past_key_values, input_ids.shape[0])
        mask = mask_for("attention_mask", attention_mask, input_ids, past_length)
        if position_ids is not None:
            position_ids = same_shape("position_ids", position_ids, input_ids.shape)
        if labels is not None:
            labels = same_shape("labels", token_ids("labels", labels), input_ids.shape)
        self.check_inputs(input_ids, mask, position_ids, labels, past_length=past_length, traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, position_ids,
                             dropout_rng, train=train, lora=self.lora if params is None else None,
                             lora_dropout=self.lora_dropout if params is None else 0.0, labels=labels,
                             output_hidden_states=self.wants_hidden_states(output_hidden_states),
                             past_key_values=past_key_values, use_cache=bool(use_cache))

    def generation_prompt_length(self, input_ids: jax.Array, decoder_input_ids: Any = None,
                                 decoder_start_token_id: int | None = None) -> int:
        """The length generation_config's max_length / min_length count from: the (padded) prompt T."""
        return int(input_ids.shape[1])

    def check_inputs(self, input_ids: Any, attention_mask: Any, position_ids: Any = None, labels: Any = None, *,
                     past_length: int = 0, traced: bool = False) -> None:
        """Token ids in [0, vocab_size), a mask (covering `past_length` cached tokens too), positions and labels
        (if any) of their shape, positions within a learned position table and labels in [0, vocab_size) or
        -100, else InputError.

        Concrete values are checked here; traced ones only with `traced=True` (checkify).
        """
        if labels is not None:
            check_shape("labels", labels, input_ids.shape)
            check_labels("labels", labels, self.vocab_size, traced=traced)
        self.check_token_inputs(input_ids, attention_mask, position_ids, past_length=past_length, traced=traced)
