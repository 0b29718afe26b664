"""Causal LMs: forward and generation over a family's Linen module."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from trlax.models.base import FlaxPreTrainedModel, check_integer_ids, check_mask
from trlax.models.layers import LORA_COLLECTION
from trlax.models.outputs import CausalLMOutput


class FlaxModelForCausalLM(FlaxPreTrainedModel):
    """A decoder-only LM (GPT-2, Llama, ...). Build it with `FlaxAutoModelForCausalLM`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forward = jax.jit(self.apply, static_argnames=("train", "output_hidden_states"))
        self._generate_fns: dict[Any, Any] = {}

    def dummy_inputs(self) -> tuple[Any, ...]:
        ids = jnp.zeros((1, 1), jnp.int32)
        return ids, jnp.ones_like(ids)

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
    ) -> CausalLMOutput:
        """The pure forward (no checks, no jit): what a jitted train step calls.

        lora: a LoRA adapter tree (`trlax.adapters`) applied on top of `params`, or None
        for the base model alone.
        """
        if train and dropout_rng is None:
            raise ValueError("train=True needs dropout_rng (a jax.random key) for dropout")
        rngs = {"dropout": dropout_rng} if train else None
        variables = {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}
        with self.sharding_context():
            return self.module.apply(variables, input_ids, attention_mask, position_ids,
                                     deterministic=not train, output_hidden_states=output_hidden_states, rngs=rngs)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: dict[str, Any] | None = None,
        output_hidden_states: bool = False,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> CausalLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, T] int; attention_mask: [B, T] (1 = token, 0 = pad; left or right
        padding), default all ones; position_ids: [B, T], default `arange(T)` as
        transformers' PyTorch forward (pass `cumsum(mask) - 1` for left-padded batches
        if you want padding-independent positions). Returns a CausalLMOutput whose
        logits are [B, T, V] float32.
        """
        input_ids = check_integer_ids("input_ids", input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else check_mask(
            "attention_mask", attention_mask, input_ids.shape)
        if position_ids is not None:
            position_ids = check_mask("position_ids", position_ids, input_ids.shape)
        return self._forward(self.params if params is None else params, input_ids, mask, position_ids,
                             dropout_rng, train=train, output_hidden_states=output_hidden_states)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, params: dict[str, Any] | None = None,
                 **kwargs: Any) -> Any:
        """Jit-compiled generation with a KV cache; see `trlax.generation.generate`."""
        from trlax.generation import generate

        return generate(self, input_ids, attention_mask, params=params, **kwargs)
