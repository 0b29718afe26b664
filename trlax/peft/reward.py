"""Reward adapters (TRL's multi-adapter PPO): a PEFT LoRA reward model on the policy's frozen base.

The adapter is one trained with PEFT on `AutoModelForSequenceClassification` (task
SEQ_CLS, `modules_to_save=["score"]`): its LoRA weights plus the full `score` head
(`base_model.model.score.weight` [num_labels, H], bias if any). trlax keeps both outside
the policy's params, as `{"lora": <adapter tree>, "score": {"kernel": [H, num_labels],
"bias"?: [num_labels]}}`, so policy gradients never reach them; the reward forward is the
base with the reward adapter on, then the score head on every position, as TRL's
`compute_reward_score` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from trlax.checkpoint.hub import HubOptions
from trlax.errors import CheckpointError, TrlaxError, UnsupportedModelError
from trlax.models.base import FlaxPreTrainedModel
from trlax.peft.lora import AdapterFiles, LoraConfig, check_applied, lora_from_peft, read_adapter

SCORE_MODULE = "score"  # TRL's `supported_rm_modules`


def load_reward_adapter(pretrained_model: FlaxPreTrainedModel, source: str, hidden_size: int, *,
                        base_name: str | None, options: HubOptions | None = None) -> tuple[LoraConfig, dict[str, Any]]:
    """(config, reward params) of the PEFT reward adapter saved in `source` (a folder or hub id), checked against
    the base model (see `reward_adapter_from`)."""
    if not isinstance(source, str):
        raise TrlaxError(f"reward_adapter must be a local folder or a hub id (str); got {type(source).__name__}")
    return reward_adapter_from(pretrained_model, read_adapter(source, options), hidden_size, base_name=base_name)


def reward_adapter_from(pretrained_model: FlaxPreTrainedModel, files: AdapterFiles, hidden_size: int, *,
                        base_name: str | None) -> tuple[LoraConfig, dict[str, Any]]:
    """(config, reward params) of a PEFT reward adapter as read (`files`: PEFT's keys, the `score` head's
    `base_model.model.score.weight` [num_labels, H] and bias among them), checked against the base model.

    hidden_size: the width of the base's last hidden state (the score head's input).
    Raises CheckpointError when the adapter does not fit the base or has no `score`
    weights, UnsupportedModelError for anything else it saves in full or a seq2seq base.
    """
    if pretrained_model.is_encoder_decoder:
        raise UnsupportedModelError(f"reward adapters need a causal LM base (TRL's sequence-classification reward "
                                    f"models); {pretrained_model.config.model_type} is encoder-decoder")
    source = files.source
    lora, saved = lora_from_peft(files, pretrained_model.params, pretrained_model.config.model_type,
                                 base_name=base_name)
    score = {key.split(".", 1)[1]: value for key, value in saved.items() if key.split(".")[0] == SCORE_MODULE}
    others = sorted(key for key in saved if key.split(".")[0] != SCORE_MODULE)
    if others:
        raise UnsupportedModelError(f"reward adapter {source} saves {others[:4]} in full (modules_to_save); trlax's "
                                    f"reward adapters support only the '{SCORE_MODULE}' head")
    if "weight" not in score:
        raise CheckpointError(
            f"reward adapter {source} has no score head weights (base_model.model.{SCORE_MODULE}.weight): save it "
            "from AutoModelForSequenceClassification + LoRA with modules_to_save=['score'] (PEFT's SEQ_CLS task "
            "does this), as TRL's RewardTrainer does")
    unknown = sorted(set(score) - {"weight", "bias"})
    weight = score["weight"]  # [num_labels, H]
    if unknown or weight.ndim != 2 or weight.shape[1] != hidden_size:
        raise CheckpointError(f"reward adapter {source}: score head {sorted(score)} with weight shape "
                              f"{tuple(weight.shape)} does not fit the base's hidden size {hidden_size} "
                              "(expected score.weight [num_labels, hidden] and an optional score.bias)")
    dtype = pretrained_model.param_dtype
    head = {"kernel": jnp.asarray(weight.T, dtype)}  # [H, num_labels]
    if "bias" in score:
        if tuple(score["bias"].shape) != (weight.shape[0],):
            raise CheckpointError(f"reward adapter {source}: score.bias has shape {tuple(score['bias'].shape)}, "
                                  f"expected ({weight.shape[0]},)")
        head["bias"] = jnp.asarray(score["bias"], dtype)
    check_applied(pretrained_model, lora)
    return files.config, {"lora": lora, SCORE_MODULE: head}


def reward_scores(pretrained_model: FlaxPreTrainedModel, base_params: dict[str, Any], reward_params: dict[str, Any],
                  input_ids: jax.Array, attention_mask: jax.Array,
                  position_ids: jax.Array | None = None) -> jax.Array:
    """Per-token reward scores [B, T, num_labels] float32 (pure; jit it or call inside a jitted step).

    The base with the reward adapter on, then the score head on the last hidden state (the
    LM head's input, TRL's `hidden_states[-1]`), in the model's compute dtype. Gradients
    are stopped: neither the base nor the reward params are trained through this.
    """
    base_params, reward_params = jax.lax.stop_gradient((base_params, reward_params))
    out = pretrained_model.apply(base_params, input_ids, attention_mask, position_ids, lora=reward_params["lora"])
    head = reward_params[SCORE_MODULE]
    dtype = pretrained_model.dtype
    scores = jnp.dot(out.last_hidden_state.astype(dtype), head["kernel"].astype(dtype))  # [B, T, L]
    if "bias" in head:
        scores = scores + head["bias"].astype(dtype)
    return scores.astype(jnp.float32)
