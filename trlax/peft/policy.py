"""LoRA policy adapters for the value-head wrappers (TRL + PEFT's multi-adapter setup), as data.

An adapter policy's params are `{"pretrained_model": <base, frozen>, "lora": <policy
adapter>, "v_head": ...}`: the forward passes the "lora" tree with the base params, so
the base is never merged or copied, and the wrapper's `trainable_mask` covers only the
adapter's `lora_A` / `lora_B` and the value head. Its reference model is the same base
arrays with the adapter off. A reward adapter (`trlax.peft.reward`) lives outside the
policy's params, so policy gradients never see it; it scores on the policy's frozen base.

Adapter names only label in-memory slots, as in TRL: the policy adapter is "default";
`from_pretrained(reward_adapter_name=...)` defaults to TRL's "reward_adapter" (TRL's
lower-level `add_and_load_reward_modeling_adapter` defaults to "reward_model_adapter";
no file depends on either).

The functions here read and write adapters and return plain data; the wrapper
(`trlax.value_head`) is built from it in one step.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trlax.checkpoint.hub import HubOptions, fetch_file
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.writer import is_orbax_model, write_checkpoint_dir
from trlax.errors import CheckpointError, UnsupportedModelError
from trlax.models.auto import AutoModel
from trlax.models.base import FlaxPreTrainedModel
from trlax.peft.lora import (
    ADAPTER_CONFIG_NAME,
    LoraConfig,
    check_applied,
    check_scalings,
    init_lora,
    lora_from_peft,
    lora_modules,
    read_adapter,
    write_adapter_files,
)

logger = logging.getLogger("trlax")

POLICY_ADAPTER_NAME = "default"
DEFAULT_REWARD_ADAPTER_NAME = "reward_adapter"  # TRL's from_pretrained default
# Where a saved adapter policy keeps its value head (TRL reads either, model.safetensors first).
VALUE_HEAD_FILES = ("model.safetensors", "pytorch_model.bin")
VALUE_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")  # TRL's head: Linear(H, 1)


@dataclass(frozen=True)
class PolicyAdapter:
    """A LoRA policy adapter: its PEFT config, its weights (`lora` tree) and whether they train."""

    config: LoraConfig
    lora: dict[str, Any]
    trainable: bool


@dataclass(frozen=True)
class AdapterPolicy:
    """A saved adapter policy as loaded: the base LM, the adapter, and the value head saved beside it."""

    base: FlaxPreTrainedModel
    base_name: str
    adapter: PolicyAdapter
    # The value-head tensors saved beside it, in TRL's layout (VALUE_HEAD_KEYS: all, some, or {} for none).
    v_head_state: dict[str, np.ndarray]


def new_policy_adapter(peft_config: Any, base: FlaxPreTrainedModel, seed: int) -> PolicyAdapter:
    """A fresh trainable adapter from `peft_config` (trlax.LoraConfig, a dict of PEFT fields or a peft.LoraConfig)."""
    config = LoraConfig.from_peft(peft_config)
    if config.modules_to_save:
        raise UnsupportedModelError(f"modules_to_save={config.modules_to_save} is not supported for policy adapters "
                                    "(it trains a full copy of those modules); the value head is trained already")
    lora = init_lora(config, base.params, base.config.model_type, jax.random.fold_in(jax.random.key(seed), 1))
    check_applied(base, lora)
    return PolicyAdapter(config, lora, trainable=True)


def read_value_head(source: str | os.PathLike, options: HubOptions) -> dict[str, np.ndarray]:
    """The value-head tensors saved beside an adapter, as stored (`v_head.summary.weight` [1, H], `.bias` [1]):
    those of the first of VALUE_HEAD_FILES holding any; {} if none does."""
    for name in VALUE_HEAD_FILES:
        path = fetch_file(source, name, options)
        if path is None:
            continue
        with CheckpointReader([Path(path)]) as reader:
            found = {key: np.asarray(reader.get(key)) for key in VALUE_HEAD_KEYS if key in reader}
        if found:
            return found
    return {}


def load_adapter_policy(auto_class: type[AutoModel], source: str | os.PathLike, options: HubOptions,
                        model_args: dict[str, Any], *, is_trainable: bool) -> AdapterPolicy:
    """A saved adapter policy (PEFT adapter + TRL value head), as TRL loads one.

    The base comes from the adapter's `base_model_name_or_path` (loaded with `model_args`, at the
    revision adapter_config.json names, as PEFT loads it: the adapter's own revision is not the
    base's); the adapter is trainable only with `is_trainable=True` (TRL's and PEFT's default is
    inference mode).
    """
    files = read_adapter(source, options)
    base_name = files.config.base_model_name_or_path
    if not base_name:
        raise CheckpointError(f"adapter {source} has no base_model_name_or_path in {ADAPTER_CONFIG_NAME}; load the "
                              "base and pass the adapter as peft_config/reward_adapter instead")
    base = auto_class.from_pretrained(base_name, **{**model_args, "revision": files.config.revision})
    lora, saved = lora_from_peft(files, base.params, base.config.model_type, base_name=base_name)
    if saved:
        raise UnsupportedModelError(f"adapter {source} saves {sorted(saved)[:4]} in full (modules_to_save); trlax "
                                    "policy adapters support LoRA weights only")
    check_applied(base, lora)
    return AdapterPolicy(base, base_name, PolicyAdapter(files.config, lora, is_trainable),
                         read_value_head(source, options))


def write_adapter_policy(save_directory: str | os.PathLike, base: FlaxPreTrainedModel, config: LoraConfig,
                         lora: dict[str, Any], head_state: dict[str, np.ndarray], *,
                         base_name: str | None) -> list[Path]:
    """PEFT's adapter layout (adapter_config.json + adapter_model.safetensors) plus TRL's value
    head (`head_state`: `v_head.summary.*`, in model.safetensors). `peft.PeftModel.from_pretrained`
    loads the adapter, TRL's from_pretrained the adapter and the head; the base is not written."""
    if base_name and is_orbax_model(base_name):
        logger.warning("this adapter names its base %s, an Orbax model folder, which PEFT, TRL and from_pretrained "
                       "cannot load: write a transformers checkpoint of the base (`trlax convert %s DST --to hf`) "
                       "and set base_model_name_or_path in %s to DST", base_name, base_name, ADAPTER_CONFIG_NAME)
    check_scalings(config, lora, base.config.model_type)
    keep = [re.compile(p) for p in base.spec.keep_layout]
    keeps_layout = any(k.match(f"{path}.weight") for path in lora_modules(lora) for k in keep)
    task_type = "SEQ_2_SEQ_LM" if base.is_encoder_decoder else "CAUSAL_LM"

    def write_adapter(folder: Path) -> None:
        write_adapter_files(folder, config, lora, model_type=base.config.model_type, base_name=base_name,
                            task_type=task_type, keeps_layout=keeps_layout)

    return write_checkpoint_dir(save_directory, head_state, write_extra=write_adapter)
