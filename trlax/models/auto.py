"""trlax's auto classes: `config.model_type` picks the family (`trlax.models.registry`)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax.numpy as jnp
import transformers

from trlax.models.base import FlaxPreTrainedModel
from trlax.models.causal import FlaxModelForCausalLM
from trlax.models.registry import supported_model_types
from trlax.models.seq2seq import FlaxModelForSeq2SeqLM

__all__ = ["FlaxAutoModelForCausalLM", "FlaxAutoModelForSeq2SeqLM", "supported_model_types"]


class AutoModel:
    """`from_config` / `from_pretrained` on `model_class`, whose family the config's model_type picks."""

    model_class: ClassVar[type[FlaxPreTrainedModel]]

    @classmethod
    def from_config(cls, config: transformers.PretrainedConfig, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, seed: int = 0) -> Any:
        """A randomly initialised trlax model for a transformers config."""
        return cls.model_class.from_config(config, dtype=dtype, param_dtype=param_dtype, seed=seed)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a transformers checkpoint (local folder or hub id); see FlaxPreTrainedModel.from_pretrained."""
        return cls.model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


class FlaxAutoModelForCausalLM(AutoModel):
    """trlax's auto class for decoder-only LMs: `from_config` / `from_pretrained`."""

    model_class = FlaxModelForCausalLM


class FlaxAutoModelForSeq2SeqLM(AutoModel):
    """trlax's auto class for encoder-decoder LMs (T5, BART): `from_config` / `from_pretrained`."""

    model_class = FlaxModelForSeq2SeqLM
