"""trlax: TRL's value-head model wrappers, reference models and reward adapters in JAX/Flax."""

from trlax import ppo
from trlax.errors import CheckpointError, InputError, TrlaxError, UnsupportedModelError
from trlax.generation import GenerateOutput, GenerationSettings
from trlax.models.auto import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
    supported_model_types,
)
from trlax.peft.lora import LoraConfig
from trlax.reference import LAYER_PATTERNS, create_reference_model
from trlax.trainable import masked_optimizer, merge_trainable, split_trainable
from trlax.value_head import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    ValueHead,
)

__version__ = "0.2.0"

__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "CheckpointError",
    "FlaxAutoModelForCausalLM",
    "FlaxAutoModelForCausalLMWithValueHead",
    "FlaxAutoModelForSeq2SeqLM",
    "FlaxAutoModelForSeq2SeqLMWithValueHead",
    "FlaxAutoModelForSequenceClassification",
    "GenerateOutput",
    "GenerationSettings",
    "InputError",
    "LAYER_PATTERNS",
    "LoraConfig",
    "PreTrainedModelWrapper",
    "TrlaxError",
    "UnsupportedModelError",
    "ValueHead",
    "create_reference_model",
    "masked_optimizer",
    "merge_trainable",
    "ppo",
    "split_trainable",
    "supported_model_types",
]
