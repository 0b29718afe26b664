"""LoRA policy and reward adapters on the value-head wrappers (TRL + PEFT's multi-adapter setup).

An adapter policy's params are `{"pretrained_model": <base, frozen>, "lora": <policy
adapter>, "v_head": ...}`: the forward passes the "lora" tree with the base params, so
the base is never merged or copied, and `trainable_mask` covers only the adapter's
`lora_A` / `lora_B` and the value head. Its reference model is the same base arrays with
the adapter off. A reward adapter lives outside the policy's params, in
`model.reward_params` (`trlax.reward`), so policy gradients never see it; it scores on
the policy's frozen base.

Adapter names only label in-memory slots, as in TRL: the policy adapter is "default";
`from_pretrained(reward_adapter_name=...)` defaults to TRL's "reward_adapter" (TRL's
lower-level `add_and_load_reward_modeling_adapter` defaults to "reward_model_adapter";
no file depends on either).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from trlax.adapters import (
    ADAPTER_CONFIG_NAME,
    LoraConfig,
    check_applied,
    init_lora,
    lora_from_peft,
    lora_modules,
    read_adapter,
    trainable_lora_mask,
    write_adapter_files,
)
from trlax.checkpoint.hub import HubOptions, fetch_file
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.writer import write_checkpoint_dir
from trlax.errors import CheckpointError, UnsupportedModelError
from trlax.reward import load_reward_adapter

logger = logging.getLogger("trlax")

POLICY_ADAPTER_NAME = "default"
DEFAULT_REWARD_ADAPTER_NAME = "reward_adapter"  # TRL's from_pretrained default
# Where a saved adapter policy keeps its value head (TRL reads either, model.safetensors first).
VALUE_HEAD_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_options(model_args: dict[str, Any]) -> HubOptions:
    return HubOptions(model_args.get("revision"), model_args.get("token"), model_args.get("cache_dir"),
                      bool(model_args.get("local_files_only", False)))


def is_adapter_folder(source: str | os.PathLike, options: HubOptions) -> bool:
    """True when `source` (folder or hub id) holds a PEFT adapter_config.json rather than a full model."""
    local = Path(source)
    if local.is_dir():
        return (local / ADAPTER_CONFIG_NAME).is_file()
    if local.exists() or local.is_absolute():
        return False
    try:
        return fetch_file(source, ADAPTER_CONFIG_NAME, options) is not None
    except CheckpointError:  # unreachable repo: let the regular loader say why
        return False


def attach_policy_adapter(model: Any, config: LoraConfig, lora: dict[str, Any], *, trainable: bool) -> None:
    """Make `model` an adapter policy: base frozen, `lora` (trainable or not) and the value head trainable."""
    check_applied(model.pretrained_model, lora)
    model.params = {"pretrained_model": model.params["pretrained_model"], "lora": lora,
                    "v_head": model.params["v_head"]}
    model.trainable_mask = {
        "pretrained_model": jax.tree_util.tree_map(lambda _: False, model.params["pretrained_model"]),
        "lora": trainable_lora_mask(lora, trainable),
        "v_head": jax.tree_util.tree_map(lambda _: True, model.params["v_head"]),
    }
    model.is_peft_model = True
    model.peft_config[POLICY_ADAPTER_NAME] = config


def add_policy_adapter(model: Any, peft_config: Any, seed: int) -> None:
    """A fresh trainable adapter from `peft_config` (trlax.LoraConfig, a dict of PEFT fields or a peft.LoraConfig)."""
    config = LoraConfig.from_peft(peft_config)
    if config.modules_to_save:
        raise UnsupportedModelError(f"modules_to_save={config.modules_to_save} is not supported for policy adapters "
                                    "(it trains a full copy of those modules); the value head is trained already")
    if config.lora_dropout:
        logger.warning("lora_dropout=%s is not applied by trlax (its LoRA forward is deterministic); it is kept in "
                       "the config and saved with the adapter", config.lora_dropout)
    base = model.params["pretrained_model"]
    lora = init_lora(config, base, model.config.model_type, jax.random.fold_in(jax.random.key(seed), 1))
    attach_policy_adapter(model, config, lora, trainable=True)


def read_value_head(source: str | os.PathLike, options: HubOptions) -> dict[str, Any] | None:
    """The value head saved beside an adapter ({"summary": {"kernel": [H, 1], "bias": [1]}}), or None."""
    for name in VALUE_HEAD_FILES:
        path = fetch_file(source, name, options)
        if path is None:
            continue
        with CheckpointReader([Path(path)]) as reader:
            if "v_head.summary.weight" in reader and "v_head.summary.bias" in reader:
                return {"summary": {"kernel": jnp.asarray(reader.get("v_head.summary.weight").T, jnp.float32),
                                    "bias": jnp.asarray(reader.get("v_head.summary.bias"), jnp.float32)}}
    return None


def load_adapter_policy(cls: Any, source: str | os.PathLike, *, strict: bool, seed: int, trl_args: dict[str, Any],
                        model_args: dict[str, Any], is_trainable: bool) -> Any:
    """A wrapper from a saved adapter policy (PEFT adapter + TRL value head), as TRL loads one.

    The base comes from the adapter's `base_model_name_or_path`; the adapter is trainable
    only with `is_trainable=True` (TRL's and PEFT's default is inference mode).
    """
    options = hub_options(model_args)
    files = read_adapter(source, options)
    base_name = files.config.base_model_name_or_path
    if not base_name:
        raise CheckpointError(f"adapter {source} has no base_model_name_or_path in {ADAPTER_CONFIG_NAME}; load the "
                              "base and pass the adapter as peft_config/reward_adapter instead")
    lm = cls.auto_class.from_pretrained(base_name, **model_args)
    v_head = read_value_head(source, options)
    if v_head is None:
        message = (f"{source} has no value head (v_head.summary.* in {' or '.join(VALUE_HEAD_FILES)}); initialised "
                   "a new one. This is expected unless you are resuming PPO training.")
        if strict:
            raise CheckpointError(message + " (strict=True)")
        logger.warning(message)
    model = cls(lm, v_head_params=v_head, seed=seed, **trl_args)
    model.base_model_name_or_path = base_name
    lora, saved = lora_from_peft(files, lm.params, lm.config.model_type, base_name=base_name)
    if saved:
        raise UnsupportedModelError(f"adapter {source} saves {sorted(saved)[:4]} in full (modules_to_save); trlax "
                                    "policy adapters support LoRA weights only")
    attach_policy_adapter(model, files.config, lora, trainable=is_trainable)
    return model


def add_reward_adapter(model: Any, source: str, name: str, options: HubOptions) -> None:
    """Load a PEFT reward adapter + score head into `model.reward_params` (outside the policy's params)."""
    if not model.is_peft_model:
        raise ValueError("reward_adapter can only be used with a LoRA policy (pass peft_config=... or load a saved "
                         "adapter policy): the reward adapter scores on the frozen base, which a fully trained "
                         "policy would change")
    config, reward_params = load_reward_adapter(model.pretrained_model, source, model.v_head.hidden_size,
                                                base_name=model.base_model_name_or_path, options=options)
    check_applied(model.pretrained_model, reward_params["lora"])
    model.reward_params = reward_params
    model.rm_adapter_name = name
    model.supports_rm_adapter = True
    model.peft_config[name] = config


def save_adapter_policy(model: Any, save_directory: str | os.PathLike,
                        params: dict[str, Any] | None = None) -> list[Path]:
    """PEFT's adapter layout (adapter_config.json + adapter_model.safetensors) plus TRL's value
    head (`v_head.summary.*`, in model.safetensors). `peft.PeftModel.from_pretrained` loads
    the adapter, TRL's from_pretrained the adapter and the head; the base is not written."""
    params = model.params if params is None else params
    spec = model.pretrained_model.spec
    keep = [re.compile(p) for p in spec.keep_layout]
    keeps_layout = any(k.match(f"{path}.weight") for path in lora_modules(params["lora"]) for k in keep)
    task_type = "SEQ_2_SEQ_LM" if model.pretrained_model.is_encoder_decoder else "CAUSAL_LM"

    def write_adapter(folder: Path) -> None:
        write_adapter_files(folder, model.peft_config[POLICY_ADAPTER_NAME], params["lora"],
                            base_name=model.base_model_name_or_path, task_type=task_type, keeps_layout=keeps_layout)

    return write_checkpoint_dir(save_directory, model.state_dict(params), write_extra=write_adapter)


def adapter_reference(model: Any) -> Any:
    """The reference of an adapter policy: the same base arrays with the adapter off, frozen.

    No base weight is copied (the base is frozen in the policy, so sharing it is safe even
    when a train step donates the trainable params); the value head, which the policy
    trains, is copied.
    """
    head = model.v_head
    v_head = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding, may_alias=False), model.params["v_head"])
    ref = type(model)(model.pretrained_model, v_head_params=v_head, summary_dropout_prob=head.dropout_prob,
                      v_head_initializer_range=head.initializer_range, v_head_init_strategy=head.init_strategy)
    ref.params["pretrained_model"] = model.params["pretrained_model"]
    ref.trainable_mask = jax.tree_util.tree_map(lambda _: False, ref.params)
    ref.frozen = True
    ref.base_model_name_or_path = model.base_model_name_or_path
    return ref
