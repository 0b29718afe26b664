"""trlax's own Flax (Linen) models, one file per architecture family."""

from trlax.models.auto import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM, supported_model_types

__all__ = ["FlaxAutoModelForCausalLM", "FlaxAutoModelForSeq2SeqLM", "supported_model_types"]
