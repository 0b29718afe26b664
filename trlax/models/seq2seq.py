"""Encoder-decoder LMs (T5, BART): forward and generation over a family's Linen module.

A seq2seq family module has three methods (`generation.py` and the value-head wrapper
code against them):

- `__call__(input_ids [B, Te], attention_mask [B, Te], decoder_input_ids [B, Td],
  decoder_attention_mask [B, Td], *, deterministic, output_hidden_states) -> Seq2SeqLMOutput`
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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trlax.checkpoint.hub import ResolvedCheckpoint
from trlax.checkpoint.loading import LoadReport, Placer
from trlax.checkpoint.naming import TensorRule, get_path, set_path
from trlax.models.base import FlaxPreTrainedModel, check_integer_ids, check_mask
from trlax.models.layers import LORA_COLLECTION
from trlax.models.outputs import Seq2SeqLMOutput
from trlax.models.spec import ArchitectureSpec

logger = logging.getLogger("trlax")


def _no_defaults(config: Any) -> dict[str, str | None]:
    return {}


@dataclass(frozen=True)
class Seq2SeqSpec(ArchitectureSpec):
    """ArchitectureSpec plus two checkpoint facts encoder-decoder families need.

    raw_keys: top-level params stored under their own name, not `<module>.weight`
        (BART's `final_logits_bias` buffer); never transposed.
    key_defaults: HF keys transformers fills itself when a checkpoint lacks them:
        key -> the key whose tensor it copies (T5/mT5 `lm_head.weight` -> `shared.weight`:
        transformers v5 ties them unless the checkpoint has its own lm_head), or None for
        zeros (BART's `final_logits_bias`).
    """

    is_encoder_decoder: bool = True
    raw_keys: tuple[str, ...] = ()
    key_defaults: Callable[[Any], dict[str, str | None]] = _no_defaults


class FlaxModelForSeq2SeqLM(FlaxPreTrainedModel):
    """An encoder-decoder LM (T5, mT5, BART). Build it with `FlaxAutoModelForSeq2SeqLM`."""

    is_encoder_decoder = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forward = jax.jit(self.apply, static_argnames=("train", "output_hidden_states"))
        self._generate_fns: dict[Any, Any] = {}

    def dummy_inputs(self) -> tuple[Any, ...]:
        ids = jnp.zeros((1, 1), jnp.int32)
        return ids, jnp.ones_like(ids), ids, jnp.ones_like(ids)

    # --- checkpoint keys beyond the generic naming rules ---------------------------------
    def key_table(self, abstract: dict[str, Any] | None = None,
                  path_prefix: tuple[str, ...] = ()) -> dict[str, TensorRule]:
        """HF state-dict key -> where it lives in this model's params (raw keys included)."""
        abstract = abstract if abstract is not None else self.abstract_params()
        raw_names = getattr(self.spec, "raw_keys", ())
        table = super().key_table({k: v for k, v in abstract.items() if k not in raw_names}, path_prefix)
        for name in raw_names:
            leaf = abstract[name]
            table[name] = TensorRule((*path_prefix, name), False, tuple(leaf.shape), leaf.dtype)
        return table

    def load_checkpoint(
        self, resolved: ResolvedCheckpoint, table: dict[str, TensorRule], ignored: tuple[str, ...], *,
        optional_prefixes: tuple[str, ...] = (), place: Placer | None = None,
    ) -> tuple[dict[str, Any], LoadReport]:
        """Read `table`'s tensors; keys transformers fills itself (`key_defaults`) may be absent."""
        defaults = {k: src for k, src in getattr(self.spec, "key_defaults", _no_defaults)(self.config).items()
                    if k in table}
        params, report = super().load_checkpoint(resolved, table, ignored,
                                                  optional_prefixes=(*optional_prefixes, *defaults), place=place)
        for key in [k for k in report.missing_optional if k in defaults]:
            rule, src = table[key], defaults[key]
            if src is None:
                array = np.zeros(rule.shape, rule.dtype)
            else:  # go through the HF layout: `src` may be an embedding and `key` a kernel
                array = rule.to_flax(table[src].to_hf(np.asarray(get_path(params, table[src].path))))
            set_path(params, rule.path, jax.device_put(array) if place is None else place(rule.path, array))
            report.missing_optional.remove(key)
            logger.info("%s has no %s; initialised it from %s as transformers does", resolved.source, key,
                        src or "zeros")
        return params, report

    # --- forward ------------------------------------------------------------------------
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
    ) -> Seq2SeqLMOutput:
        """The pure forward (no checks, no jit): what a jitted train step calls.

        decoder_attention_mask None means all ones (no decoder padding). lora: a LoRA
        adapter tree (`trlax.adapters`) applied on top of `params`, or None for the base.
        """
        if train and dropout_rng is None:
            raise ValueError("train=True needs dropout_rng (a jax.random key) for dropout")
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        rngs = {"dropout": dropout_rng} if train else None
        variables = {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}
        with self.sharding_context():
            return self.module.apply(variables, input_ids, attention_mask, decoder_input_ids,
                                     decoder_attention_mask, deterministic=not train,
                                     output_hidden_states=output_hidden_states, rngs=rngs)

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
    ) -> Seq2SeqLMOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids: [B, Te] int (encoder input); attention_mask: [B, Te] (1 = token, 0 = pad,
        either side), default all ones. decoder_input_ids: [B, Td] int, required (unlike
        transformers, no labels are shifted here); decoder_attention_mask: [B, Td], default
        all ones. Returns a Seq2SeqLMOutput: logits [B, Td, V] float32, last_hidden_state
        [B, Td, H] (the decoder state TRL's value head reads), encoder_last_hidden_state
        [B, Te, H], and with output_hidden_states the per-layer states as transformers.
        """
        input_ids = check_integer_ids("input_ids", input_ids)
        if decoder_input_ids is None:
            start = getattr(self.config, "decoder_start_token_id", None)
            raise ValueError(
                "an encoder-decoder model needs decoder_input_ids [B, Td]: pass the labels shifted right "
                f"(starting with config.decoder_start_token_id={start}), or [[{start}]] * batch for the "
                "first-step logits; trlax does not derive them from input_ids or labels."
            )
        decoder_input_ids = check_integer_ids("decoder_input_ids", decoder_input_ids)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"decoder_input_ids has batch size {decoder_input_ids.shape[0]} but input_ids has "
                             f"{input_ids.shape[0]}; they must match")
        mask = jnp.ones_like(input_ids) if attention_mask is None else check_mask(
            "attention_mask", attention_mask, input_ids.shape)
        dmask = jnp.ones_like(decoder_input_ids) if decoder_attention_mask is None else check_mask(
            "decoder_attention_mask", decoder_attention_mask, decoder_input_ids.shape)
        return self._forward(self.params if params is None else params, input_ids, mask, decoder_input_ids, dmask,
                             dropout_rng, train=train, output_hidden_states=output_hidden_states)

    def generate(self, input_ids: Any, attention_mask: Any = None, *, params: dict[str, Any] | None = None,
                 **kwargs: Any) -> Any:
        """Jit-compiled generation with a KV cache; see `trlax.generation.generate`."""
        from trlax.generation import generate

        return generate(self, input_ids, attention_mask, params=params, **kwargs)
