"""Where `trlax ppo` gets its scalar reward per reply: a reward model, a reward adapter, or a Python function.

Each source is called once per PPO step with the generated batch and returns scores [B]
float32 (TRL's classic PPO adds each at the reply's last token):

- `ModelReward`: a sequence-classification checkpoint (`FlaxAutoModelForSequenceClassification`,
  label 0) on prompt + reply. With the policy's vocabulary it reads the ids as generated;
  with its own tokenizer it re-tokenizes the decoded texts. The score is read at the last
  real token (the attention mask's, as TRL's `get_reward` does), with positions counted
  over real tokens only, so padding never changes it.
- `AdapterReward`: the PEFT reward adapter loaded on the LoRA policy's frozen base
  (`compute_reward_score`, TRL's multi-adapter PPO), label 0 at the last real token.
- `FunctionReward`: `module:function`, called as `function(prompts=[str], completions=[str])`
  and returning one number per completion (TRL's reward-function convention).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trlax.errors import TrlaxError
from trlax.models.sequence_classification import FlaxModelForSequenceClassification
from trlax.peft.reward import reward_scores
from trlax.ppo_data import TextCodec
from trlax.value_head import PreTrainedModelWrapper

Array = jax.Array


class RewardError(TrlaxError):
    """A reward source that cannot be loaded or returned unusable scores."""


def last_token_index(attention_mask: Array) -> Array:
    """[B] int32: the last position whose mask is 1 (0 for an empty row)."""
    t = attention_mask.shape[1]
    return (t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)).astype(jnp.int32)


def real_positions(attention_mask: Array) -> Array:
    """Positions [B, T] counted over real tokens only (cumsum(mask) - 1, floored at 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)


def at_last_token(token_scores: Array, attention_mask: Array) -> Array:
    """token_scores [B, T, L] -> [B] float32: label 0 at each row's last real token."""
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(token_scores[..., 0], index[:, None], axis=1)[:, 0].astype(jnp.float32)


@dataclass
class Generated:
    """One step's replies: sequences [B, P+N] (left-padded prompt, reply, pads after an eos),
    attention_mask [B, P+N], and the decoded prompt and reply texts (None unless a source needs them)."""

    sequences: np.ndarray
    attention_mask: np.ndarray
    prompts: list[str] | None = None
    completions: list[str] | None = None


class ModelReward:
    """A sequence-classification reward model; `codec` is its own tokenizer, or None to read the policy's ids."""

    needs_text: bool

    def __init__(self, model: FlaxModelForSequenceClassification, codec: TextCodec | None, source: str,
                 pad_id: int = 0) -> None:
        self.model, self.codec, self.pad_id = model, codec, pad_id
        self.needs_text = codec is not None
        self.description = (f"reward model {source} ({model.config.model_type}, {model.num_params():,} params, "
                            f"label 0 of {model.config.num_labels}) at the last reply token")

        def score(params: dict[str, Any], ids: Array, mask: Array) -> Array:
            out = model.apply(params, ids, mask, real_positions(mask))
            return at_last_token(out.token_logits, mask)

        self._score = jax.jit(score)

    def __call__(self, generated: Generated) -> np.ndarray:
        if self.codec is None:
            ids, mask = generated.sequences, generated.attention_mask
        else:
            ids, mask = self._encode(generated)
        return np.asarray(self._score(self.model.params, jnp.asarray(ids), jnp.asarray(mask)))

    def _encode(self, generated: Generated) -> tuple[np.ndarray, np.ndarray]:
        """The texts in the reward model's tokens, right-padded to a multiple of 32 (few compilations)."""
        encoded = [self.codec.encode(p + c) for p, c in zip(generated.prompts, generated.completions, strict=True)]
        width = max(32, -(-max(len(e) for e in encoded) // 32) * 32)
        ids = np.full((len(encoded), width), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
        return ids, mask


class AdapterReward:
    """The policy's PEFT reward adapter (on its frozen base)."""

    needs_text = False

    def __init__(self, policy: PreTrainedModelWrapper, source: str) -> None:
        if policy.reward_params is None:
            raise RewardError("the policy has no reward adapter loaded")
        self.policy = policy
        self.description = f"reward adapter {source} on the policy's frozen base, label 0 at the last reply token"
        lm = policy.pretrained_model

        def score(base: dict[str, Any], reward: dict[str, Any], ids: Array, mask: Array) -> Array:
            return at_last_token(reward_scores(lm, base, reward, ids, mask, real_positions(mask)), mask)

        self._score = jax.jit(score)

    def __call__(self, generated: Generated) -> np.ndarray:
        base = self.policy.params["pretrained_model"]  # frozen in a LoRA policy: never trained
        return np.asarray(self._score(base, self.policy.reward_params, jnp.asarray(generated.sequences),
                                      jnp.asarray(generated.attention_mask)))


def load_function(spec: str) -> Callable[..., Sequence[float]]:
    """`package.module:function` -> the function.

    The current directory is importable, as with `python -m trlax`: the `trlax` console
    script's `sys.path` starts with its own bin folder instead, so the directory is added.
    """
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise RewardError(f"--reward-fn {spec!r} must be MODULE:FUNCTION, e.g. my_rewards:length_bonus")
    if not {"", os.getcwd()} & set(sys.path):
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"--reward-fn: cannot import {module_name!r} ({e}); run from the folder that holds it "
                          "or put it on PYTHONPATH") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"--reward-fn: {module_name} has no function {name!r}")
    return fn


class FunctionReward:
    """A Python function of decoded texts: `fn(prompts=[str], completions=[str]) -> [float] * B`."""

    needs_text = True

    def __init__(self, fn: Callable[..., Sequence[float]], source: str) -> None:
        self.fn = fn
        self.description = f"reward function {source}(prompts, completions)"

    def __call__(self, generated: Generated) -> np.ndarray:
        scores = np.asarray(self.fn(prompts=generated.prompts, completions=generated.completions), np.float32)
        if scores.shape != (len(generated.completions),) or not np.all(np.isfinite(scores)):
            raise RewardError(f"the reward function returned {scores.shape} values (finite: "
                              f"{bool(np.all(np.isfinite(scores)))}); it must return one finite number per "
                              f"completion ({len(generated.completions)})")
        return scores
