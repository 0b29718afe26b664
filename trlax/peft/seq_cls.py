"""PEFT `SEQ_CLS` LoRA adapters on sequence-classification models (reward models trained with PEFT).

PEFT saves such an adapter as its LoRA weights plus the `score` head in full
(`modules_to_save=["score"]`, key `base_model.model.score.weight` [num_labels, H]). Loaded
here, the base's params stay as they are except for `score`, and the LoRA tree is applied
at every call (never merged); `save_pretrained` writes PEFT's layout back.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from trlax.checkpoint.hub import HubOptions
from trlax.checkpoint.saving_args import check_saving_args
from trlax.checkpoint.torch_models import peft_lm
from trlax.checkpoint.writer import write_folder
from trlax.errors import CheckpointError, TrlaxTypeError, UnsupportedModelError
from trlax.models.sequence_classification import SCORE, FlaxModelForSequenceClassification
from trlax.peft.lora import (
    ADAPTER_CONFIG_NAME,
    PEFT_PREFIX,
    LoraConfig,
    check_applied,
    check_scalings,
    lora_from_peft,
    lora_modules,
    peft_state_dict,
    read_adapter,
    write_adapter_files,
)


class FlaxPeftModelForSequenceClassification(FlaxModelForSequenceClassification):
    """A sequence-classification model with a PEFT LoRA adapter on: `lora` is applied at every call.

    `params` are the base's, with the adapter's `score` head; `adapter_config` the adapter's
    LoraConfig; `base_model_name_or_path` where the base came from (written on save).
    """

    adapter: dict[str, Any]
    adapter_config: LoraConfig
    base_model_name_or_path: str | None

    @property
    def lora(self) -> dict[str, Any] | None:
        return self.adapter

    @property
    def lora_dropout(self) -> float:
        """The adapter's PEFT lora_dropout, which forwards with `train=True` apply as PEFT's model in train mode."""
        return self.adapter_config.lora_dropout

    def num_params(self, params: dict[str, Any] | None = None) -> int:
        """The base's params (its `score` head the adapter's) plus the adapter's LoRA matrices."""
        adapter = sum(int(np.prod(np.shape(module[name]))) for module in lora_modules(self.adapter).values()
                      for name in ("lora_A", "lora_B"))
        return super().num_params(params) + adapter

    def adapter_for(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """The adapter applies to every call, `params=` given or not (they are the base's)."""
        return self.adapter

    def saved_adapter_config(self) -> LoraConfig:
        """The adapter's LoraConfig with `score` among `modules_to_save`, as PEFT's SEQ_CLS task saves it."""
        return LoraConfig.from_peft({**self.adapter_config.to_peft_dict(),
                                     "modules_to_save": sorted({*(self.adapter_config.modules_to_save or []), SCORE})})

    def to_torch(self, params: dict[str, Any] | None = None, dtype: Any = None) -> Any:
        """PEFT's PeftModelForSequenceClassification with these weights, in memory: transformers'
        `*ForSequenceClassification` base (with this model's `score`) and the LoRA adapter, as
        `peft.PeftModel.from_pretrained` builds it from the saved folder (needs torch and peft)."""
        params = self.params if params is None else params
        config = self.saved_adapter_config().to_peft_dict()
        config.update(base_model_name_or_path=self.base_model_name_or_path, task_type="SEQ_CLS", inference_mode=True)
        state = {**peft_state_dict(self.adapter, self.config.model_type), **self.score_state(params)}
        return peft_lm(super().to_torch(params, dtype), config, state)

    def score_state(self, params: dict[str, Any]) -> dict[str, np.ndarray]:
        """The `score` head under PEFT's adapter key: {"base_model.model.score.weight": [num_labels, H]}."""
        return {f"{PEFT_PREFIX}{SCORE}.weight": np.ascontiguousarray(np.asarray(params[SCORE]["kernel"]).T)}

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict[str, Any] | None = None,
                        max_shard_size: int | str | None = None, **transformers_args: Any) -> list[Path]:
        """PEFT's adapter folder (adapter_config.json, adapter_model.safetensors with the LoRA weights and
        `score`), replacing the folder atomically as every trlax save does; `peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification..., folder)` loads it. transformers' saving keywords:
        `trlax.checkpoint.saving_args`."""
        check_saving_args(transformers_args, f"{type(self).__name__}.save_pretrained")
        params = self.params if params is None else params
        keep = [re.compile(p) for p in self.spec.keep_layout]
        keeps_layout = any(k.match(f"{path}.weight") for path in lora_modules(self.adapter) for k in keep)
        config = self.saved_adapter_config()
        check_scalings(config, self.adapter, self.config.model_type)

        if max_shard_size is not None:
            raise TrlaxTypeError("an adapter is saved in one file: save_pretrained takes no max_shard_size here")
        return write_folder(save_directory, lambda folder: write_adapter_files(
            folder, config, self.adapter, model_type=self.config.model_type, base_name=self.base_model_name_or_path,
            task_type="SEQ_CLS",
            keeps_layout=keeps_layout, extra_tensors=self.score_state(params)))


def load_seq_cls_adapter(source: str | os.PathLike, options: HubOptions | None = None, *,
                         base_model: str | os.PathLike | None = None,
                         **model_args: Any) -> FlaxPeftModelForSequenceClassification:
    """A PEFT SEQ_CLS adapter folder (or hub id) on its base: `base_model`, else the adapter's
    `base_model_name_or_path` at the adapter's `revision`, loaded as a sequence-classification model with
    `model_args`."""
    files = read_adapter(str(source), options)
    base_name = str(base_model) if base_model is not None else files.config.base_model_name_or_path
    if not base_name:
        raise CheckpointError(f"adapter {source} has no base_model_name_or_path in {ADAPTER_CONFIG_NAME}; pass "
                              "base_model=PATH_OR_HUB_ID")
    weight = files.tensors.get(f"{PEFT_PREFIX}{SCORE}.weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(f"adapter {source} has no {PEFT_PREFIX}{SCORE}.weight [num_labels, hidden]: save it from "
                              "AutoModelForSequenceClassification with PEFT's SEQ_CLS task (modules_to_save=['score'])")
    num_labels = model_args.pop("num_labels", None)
    if num_labels is not None and num_labels != weight.shape[0]:
        raise CheckpointError(f"adapter {source} has a {SCORE} head of {weight.shape[0]} labels, not num_labels="
                              f"{num_labels}; load it without num_labels")
    if base_model is None:  # the base at the revision adapter_config.json names, as PEFT loads it (the policy too)
        model_args = {**model_args, "revision": files.config.revision}
    else:  # another base: the adapter's revision is not its revision, and is not saved with it
        files = dataclasses.replace(files, config=dataclasses.replace(files.config, revision=None))
    base = FlaxModelForSequenceClassification.from_pretrained(base_name, num_labels=int(weight.shape[0]), **model_args)
    lora, saved = lora_from_peft(files, base.params, base.config.model_type, base_name=base_name)
    others = sorted(set(saved) - {f"{SCORE}.weight"})
    if others:
        raise UnsupportedModelError(f"adapter {source} saves {others[:4]} in full; trlax's sequence-classification "
                                    f"adapters support only the '{SCORE}' head")
    kernel_shape = base.params[SCORE]["kernel"].shape
    if tuple(weight.T.shape) != tuple(kernel_shape):
        raise CheckpointError(f"adapter {source}: {SCORE}.weight {tuple(weight.shape)} does not fit the base's hidden "
                              f"size (score kernel {tuple(kernel_shape)})")
    check_applied(base, lora)
    model = FlaxPeftModelForSequenceClassification(base.config, base.spec, dtype=base.dtype,
                                                   param_dtype=base.param_dtype)
    if base.mesh is not None:
        model.use_mesh(base.mesh, base.sharding_rules)
    model.params = {**base.params, SCORE: {"kernel": jnp.asarray(weight.T, base.param_dtype)}}
    model.adapter, model.adapter_config, model.base_model_name_or_path = lora, files.config, base_name
    return model
