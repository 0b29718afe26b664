"""trlax's auto classes: `config.model_type` picks the family (`trlax.models.registry`)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax.numpy as jnp
import transformers

from trlax.checkpoint.hub import HubOptions
from trlax.checkpoint.torch_models import is_torch_model
from trlax.errors import CheckpointError, TrlaxTypeError
from trlax.models.base import FlaxPreTrainedModel
from trlax.models.causal import FlaxModelForCausalLM
from trlax.models.registry import supported_model_types
from trlax.models.seq2seq import FlaxModelForSeq2SeqLM
from trlax.models.sequence_classification import FlaxModelForSequenceClassification
from trlax.peft.lora import ADAPTER_CONFIG_NAME, is_adapter_folder
from trlax.peft.seq_cls import load_seq_cls_adapter

__all__ = ["FlaxAutoModelForCausalLM", "FlaxAutoModelForSeq2SeqLM", "FlaxAutoModelForSequenceClassification",
           "supported_model_types"]


def hub_options(kwargs: dict[str, Any]) -> HubOptions:
    """The hub options among `from_pretrained` keyword arguments."""
    return HubOptions(kwargs.get("revision"), kwargs.get("token"), kwargs.get("cache_dir"),
                      bool(kwargs.get("local_files_only", False)))


def is_adapter_source(source: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `from_pretrained(source, **kwargs)` names a PEFT adapter folder or hub repo (a transformers
    model in memory is none)."""
    return not is_torch_model(source) and is_adapter_folder(source, hub_options(kwargs))


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
        """Load a transformers checkpoint (local folder or hub id); see FlaxPreTrainedModel.from_pretrained.

        A PEFT adapter folder is refused, naming the class that loads it: a trlax LM holds no adapter
        of its own (a value-head wrapper's LoRA policy does).
        """
        if is_adapter_source(pretrained_model_name_or_path, kwargs):
            raise CheckpointError(
                f"{pretrained_model_name_or_path} is a PEFT adapter (it has {ADAPTER_CONFIG_NAME}), not a full model; "
                f"load it with {cls.__name__}WithValueHead.from_pretrained(...) (the adapter becomes its LoRA "
                "policy, on the base its config names), or merge it into its base in PEFT (merge_and_unload) and "
                "save that")
        return cls.model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


class FlaxAutoModelForCausalLM(AutoModel):
    """trlax's auto class for decoder-only LMs: `from_config` / `from_pretrained`."""

    model_class = FlaxModelForCausalLM


class FlaxAutoModelForSeq2SeqLM(AutoModel):
    """trlax's auto class for encoder-decoder LMs (T5, BART): `from_config` / `from_pretrained`."""

    model_class = FlaxModelForSeq2SeqLM


class FlaxAutoModelForSequenceClassification(AutoModel):
    """trlax's auto class for decoder-only sequence classifiers (reward models, TRL's separate value
    model): transformers' `score` head on any causal family. `from_pretrained` also takes a PEFT
    SEQ_CLS adapter folder (see `trlax.peft.seq_cls`) and `num_labels=` / `problem_type=`."""

    model_class = FlaxModelForSequenceClassification

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """A `*ForSequenceClassification` checkpoint, a causal-LM checkpoint (new score head, with a
        warning), or a PEFT SEQ_CLS adapter on its base (`base_model=` overrides the adapter's)."""
        if is_adapter_source(pretrained_model_name_or_path, kwargs):
            return load_seq_cls_adapter(pretrained_model_name_or_path, hub_options(kwargs), **kwargs)
        if "base_model" in kwargs:
            raise TrlaxTypeError("base_model= only applies when loading a PEFT adapter folder")
        return cls.model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
