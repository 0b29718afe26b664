"""`config.model_type` -> the family that implements it: one line per family below."""

from __future__ import annotations

import copyreg
import importlib
from functools import cache
from typing import Any

from trlax.errors import UnsupportedModelError
from trlax.models.spec import ArchitectureSpec

# One module per family; each defines SPEC. Adding a family adds its module here.
FAMILY_MODULES: tuple[str, ...] = (
    "trlax.models.gpt2",
    "trlax.models.llama",
    "trlax.models.gemma",
    "trlax.models.opt",
    "trlax.models.gpt_neo",
    "trlax.models.gpt_neox",
    "trlax.models.t5",
    "trlax.models.bart",
    "trlax.models.mixtral",
    "trlax.models.qwen3_moe",
    "trlax.models.gemma3",
    "trlax.models.phi3",
    "trlax.models.phi",
    "trlax.models.starcoder2",
    "trlax.models.bloom",
    "trlax.models.falcon",
    "trlax.models.gptj",
    "trlax.models.cohere",
    "trlax.models.granite",
    "trlax.models.gpt_bigcode",
    "trlax.models.smollm3",
    "trlax.models.olmo2",
    "trlax.models.glm4",
)


@cache
def all_specs() -> tuple[ArchitectureSpec, ...]:
    """Every family's SPEC, in FAMILY_MODULES order (imported on first use)."""
    return tuple(importlib.import_module(name).SPEC for name in FAMILY_MODULES)


def _by_type(encoder_decoder: bool) -> dict[str, ArchitectureSpec]:
    return {t: spec for spec in all_specs() if spec.is_encoder_decoder == encoder_decoder for t in spec.model_types}


def supported_model_types(encoder_decoder: bool | None = None) -> list[str]:
    """model_type values trlax implements (causal, seq2seq, or both when None)."""
    kinds = (False, True) if encoder_decoder is None else (encoder_decoder,)
    return sorted(t for kind in kinds for t in _by_type(kind))


def get_spec(model_type: str, encoder_decoder: bool = False) -> ArchitectureSpec:
    """The ArchitectureSpec for a model_type; raises UnsupportedModelError naming the supported ones."""
    specs = _by_type(encoder_decoder)
    if model_type in specs:
        return specs[model_type]
    kind, auto = ("seq2seq", "FlaxAutoModelForSeq2SeqLM") if encoder_decoder else ("causal", "FlaxAutoModelForCausalLM")
    if model_type in _by_type(not encoder_decoder):
        other_auto = "FlaxAutoModelForCausalLM" if encoder_decoder else "FlaxAutoModelForSeq2SeqLM"
        raise UnsupportedModelError(f"model_type {model_type!r} is not a {kind} LM for {auto}; use {other_auto}")
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported by trlax's {auto}; supported: {sorted(specs)}"
    )


def spec_for_type(model_type: str) -> ArchitectureSpec:
    """The family of a model_type, causal or encoder-decoder (UnsupportedModelError if neither)."""
    for encoder_decoder in (False, True):
        if model_type in _by_type(encoder_decoder):
            return _by_type(encoder_decoder)[model_type]
    raise UnsupportedModelError(f"model_type {model_type!r} is not supported by trlax; "
                                f"supported: {supported_model_types()}")


def reduce_spec(spec: ArchitectureSpec) -> tuple[Any, ...]:
    """How pickle and deepcopy take a SPEC: a registered family's by reference (its functions and Linen class
    stay where they are defined), any other field by field."""
    encoder_decoder = spec.is_encoder_decoder
    if _by_type(encoder_decoder).get(spec.model_types[0]) is spec:
        return get_spec, (spec.model_types[0], encoder_decoder)
    return copyreg.__newobj__, (ArchitectureSpec,), vars(spec)


copyreg.pickle(ArchitectureSpec, reduce_spec)
