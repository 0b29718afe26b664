"""trlax: TRL's value-head model wrappers, reference models and reward adapters in JAX/Flax."""

from trlax.errors import CheckpointError, TrlaxError, UnsupportedModelError
from trlax.models import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM, supported_model_types
from trlax.value_head import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    ValueHead,
)

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "CheckpointError",
    "FlaxAutoModelForCausalLM",
    "FlaxAutoModelForCausalLMWithValueHead",
    "FlaxAutoModelForSeq2SeqLM",
    "FlaxAutoModelForSeq2SeqLMWithValueHead",
    "PreTrainedModelWrapper",
    "TrlaxError",
    "UnsupportedModelError",
    "ValueHead",
    "supported_model_types",
]
