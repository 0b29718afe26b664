"""trlax: TRL's value-head model wrappers, reference models and reward adapters in JAX/Flax."""

from trlax.errors import CheckpointError, TrlaxError, UnsupportedModelError
from trlax.models import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FlaxAutoModelForCausalLM",
    "FlaxAutoModelForSeq2SeqLM",
    "TrlaxError",
    "UnsupportedModelError",
    "supported_model_types",
]
