"""`config.model_type` -> trlax architecture, and the auto classes built on it."""

from __future__ import annotations

import importlib
import os
from typing import Any

import jax.numpy as jnp
import transformers

from trlax.errors import UnsupportedModelError
from trlax.models.spec import ArchitectureSpec

# One module per family; each defines SPEC (and, for a family with an encoder-decoder
# variant, that is the SPEC of its own module).
_CAUSAL_FAMILIES = (
    "trlax.models.gpt2",
    "trlax.models.llama",
    "trlax.models.gemma",
    "trlax.models.opt",
    "trlax.models.gpt_neo",
    "trlax.models.gpt_neox",
)
_SEQ2SEQ_FAMILIES: tuple[str, ...] = ("trlax.models.t5", "trlax.models.bart")


def _registry(families: tuple[str, ...]) -> dict[str, ArchitectureSpec]:
    specs: dict[str, ArchitectureSpec] = {}
    for name in families:
        spec = importlib.import_module(name).SPEC
        specs.update(dict.fromkeys(spec.model_types, spec))
    return specs


def supported_model_types(encoder_decoder: bool | None = None) -> list[str]:
    """model_type values trlax implements (causal, seq2seq, or both when None)."""
    types: list[str] = []
    if encoder_decoder in (None, False):
        types += list(_registry(_CAUSAL_FAMILIES))
    if encoder_decoder in (None, True):
        types += list(_registry(_SEQ2SEQ_FAMILIES))
    return sorted(types)


def get_spec(model_type: str, encoder_decoder: bool = False) -> ArchitectureSpec:
    """The ArchitectureSpec for a model_type; raises UnsupportedModelError naming the supported ones."""
    specs = _registry(_SEQ2SEQ_FAMILIES if encoder_decoder else _CAUSAL_FAMILIES)
    if model_type in specs:
        return specs[model_type]
    other = _registry(_CAUSAL_FAMILIES if encoder_decoder else _SEQ2SEQ_FAMILIES)
    kind, auto = ("seq2seq", "FlaxAutoModelForSeq2SeqLM") if encoder_decoder else ("causal", "FlaxAutoModelForCausalLM")
    if model_type in other:
        other_auto = "FlaxAutoModelForCausalLM" if encoder_decoder else "FlaxAutoModelForSeq2SeqLM"
        raise UnsupportedModelError(f"model_type {model_type!r} is not a {kind} LM for {auto}; use {other_auto}")
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported by trlax's {auto}; supported: {sorted(specs)}"
    )


class _AutoModel:
    _encoder_decoder = False

    @classmethod
    def _model_class(cls) -> Any:
        if cls._encoder_decoder:
            from trlax.models.seq2seq import FlaxModelForSeq2SeqLM

            return FlaxModelForSeq2SeqLM
        from trlax.models.causal import FlaxModelForCausalLM

        return FlaxModelForCausalLM

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, seed: int = 0) -> Any:
        """A randomly initialised trlax model for a transformers config."""
        return cls._model_class().from_config(config, dtype=dtype, param_dtype=param_dtype, seed=seed)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a transformers checkpoint (local folder or hub id); see FlaxPreTrainedModel.from_pretrained."""
        return cls._model_class().from_pretrained(pretrained_model_name_or_path, **kwargs)


class FlaxAutoModelForCausalLM(_AutoModel):
    """trlax's auto class for decoder-only LMs: `from_config` / `from_pretrained`."""


class FlaxAutoModelForSeq2SeqLM(_AutoModel):
    """trlax's auto class for encoder-decoder LMs (T5, BART): `from_config` / `from_pretrained`."""

    _encoder_decoder = True
