"""Where `trlax ppo` gets its scalar reward per reply: a reward model, a reward adapter, or a Python function.

Each source is called once per PPO step with the generated batch and returns scores [B]
float32 (TRL's classic PPO adds each at the reply's last token):

- `ModelReward`: a sequence-classification checkpoint (`FlaxAutoModelForSequenceClassification`,
  label 0) on prompt + reply. With the policy's vocabulary it reads the ids as generated;
  with its own tokenizer it re-tokenizes the decoded texts (the prompt as the policy saw it).
  The score is read where TRL's `get_reward` and transformers' pooling read it: at the last
  real token that is not the pad id (so with pad == eos, the token before the eos), with
  positions counted over real tokens only, so padding never changes it. A prompt + reply
  longer than the model's position table, or a non-finite score, raises RewardError.
- `AdapterReward`: the PEFT reward adapter loaded on the LoRA policy's frozen base
  (`compute_reward_score`, TRL's multi-adapter PPO), label 0 at the same token.
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
from trlax.inputs import check_token_range
from trlax.models.sequence_classification import FlaxModelForSequenceClassification, last_true_index
from trlax.peft.reward import reward_scores
from trlax.ppo_data import TextCodec
from trlax.value_head import PreTrainedModelWrapper

Array = jax.Array


class RewardError(TrlaxError):
    """A reward source that cannot be loaded or returned unusable scores."""


def real_positions(attention_mask: Array) -> Array:
    """Positions [B, T] counted over real tokens only (cumsum(mask) - 1, floored at 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)


def at_last_token(token_scores: Array, attention_mask: Array, ids: Array, pad_id: int | None) -> Array:
    """token_scores [B, T, L] -> [B] float32: label 0 at each row's last real token that is not `pad_id`.

    That is where TRL's `get_reward` and transformers' pooling read a score: when pad == eos, the token
    before the eos (where TRL's reward trainer put the score), else the eos itself.
    """
    valid = attention_mask > 0
    if pad_id is not None:
        valid = valid & (ids != pad_id)
    index = last_true_index(valid)
    return jnp.take_along_axis(token_scores[..., 0], index[:, None], axis=1)[:, 0].astype(jnp.float32)


@dataclass
class Generated:
    """One step's replies: sequences [B, P+N] (left-padded prompt, reply, pads after an eos),
    attention_mask [B, P+N], the decoded prompt and reply texts (None unless a source needs them), and the
    pad id of `sequences` (None: every masked-in token is real)."""

    sequences: np.ndarray
    attention_mask: np.ndarray
    prompts: list[str] | None = None
    completions: list[str] | None = None
    pad_id: int | None = None


class ModelReward:
    """A sequence-classification reward model; `codec` is its own tokenizer, or None to read the policy's ids."""

    needs_text: bool

    def __init__(self, model: FlaxModelForSequenceClassification, codec: TextCodec | None, source: str,
                 pad_id: int | None = None) -> None:
        """pad_id: with a codec, the id the texts are padded with and that the score skips (the reward model's
        pad token; None: no skip, padding with id 0)."""
        self.model, self.codec, self.pad_id, self.source = model, codec, pad_id, source
        self.needs_text = codec is not None
        self.positions = model.spec.position_limit(model.config)  # a learned position table's rows, or None
        self.description = (f"reward model {source} ({model.config.model_type}, {model.num_params():,} params, "
                            f"label 0 of {model.config.num_labels}) at the last reply token")

        def score(params: dict[str, Any], lora: dict[str, Any] | None, ids: Array, mask: Array,
                  pad_id: int | None) -> Array:
            out = model.apply(params, ids, mask, real_positions(mask), lora=lora)
            return at_last_token(out.token_logits, mask, ids, pad_id)

        self._score = jax.jit(score, static_argnums=4)

    def __call__(self, generated: Generated) -> np.ndarray:
        """Scores [B] float32; RewardError when prompts + replies [B, T] are longer than the model's position table."""
        if self.codec is None:
            ids, mask, pad = generated.sequences, generated.attention_mask, generated.pad_id
        else:
            (ids, mask), pad = self._encode(generated), self.pad_id
        longest = int(np.asarray(mask).sum(axis=1).max())  # positions count real tokens, not the padded width
        if self.positions is not None and longest > self.positions:
            raise RewardError(f"the reward model {self.source} has {self.positions} positions, but a prompt + reply "
                              f"holds {longest} of its tokens; lower --max-prompt-length or --max-new-tokens, or "
                              "use a reward model with more positions")
        check_token_range("the reward model's input_ids", ids, self.model.vocab_size)
        # A PEFT SEQ_CLS adapter applies on its base's params, as at the model's own calls.
        scores = np.asarray(self._score(self.model.params, self.model.adapter_for(None), jnp.asarray(ids),
                                        jnp.asarray(mask), pad))
        if not np.all(np.isfinite(scores)):
            raise RewardError(f"the reward model {self.source} returned non-finite scores {scores.tolist()}; check "
                              "its weights")
        return scores

    def _encode(self, generated: Generated) -> tuple[np.ndarray, np.ndarray]:
        """The texts in the reward model's tokens, right-padded to a multiple of 32 (few compilations), at most
        to the model's positions when the texts fit them."""
        encoded = [self.codec.encode(p + c) for p, c in zip(generated.prompts, generated.completions, strict=True)]
        longest = max(len(e) for e in encoded)
        width = max(32, -(-longest // 32) * 32)
        if self.positions is not None and longest <= self.positions:
            width = min(width, self.positions)
        ids = np.full((len(encoded), width), 0 if self.pad_id is None else self.pad_id, np.int32)
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

        def score(base: dict[str, Any], reward: dict[str, Any], ids: Array, mask: Array, pad_id: int | None) -> Array:
            return at_last_token(reward_scores(lm, base, reward, ids, mask, real_positions(mask)), mask, ids, pad_id)

        self._score = jax.jit(score, static_argnums=4)

    def __call__(self, generated: Generated) -> np.ndarray:
        base = self.policy.params["pretrained_model"]  # frozen in a LoRA policy: never trained
        scores = np.asarray(self._score(base, self.policy.reward_params, jnp.asarray(generated.sequences),
                                        jnp.asarray(generated.attention_mask), generated.pad_id))
        if not np.all(np.isfinite(scores)):
            raise RewardError(f"the {self.description} returned non-finite scores {scores.tolist()}; check the "
                              "adapter's weights")
        return scores


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
        try:
            scores = self.fn(prompts=generated.prompts, completions=generated.completions)
        except Exception as e:  # the user's code: say so, rather than let it pass for a trlax bug
            raise RewardError(f"the {self.description} raised {type(e).__name__}: {e}") from e
        return checked_scores(scores, len(generated.completions), self.description)


def checked_scores(scores: Any, batch: int, source: str) -> np.ndarray:
    """A reward source's scores as [batch] float32; RewardError naming `source` unless they are one finite
    number per completion (a NaN would otherwise surface as a diverged step, blamed on the learning rate)."""
    values = None
    try:
        raw = np.asarray(scores)
        reason = f"{raw.dtype} values"
        if raw.dtype.kind not in "USVc":  # not strings numpy would parse, bytes, records, complex numbers
            values = raw.astype(np.float32)
    except Exception as e:  # noqa: BLE001 - the user's object: a torch tensor needing grad raises RuntimeError
        reason = str(e)
    if values is None:
        raise RewardError(f"the {source} returned {type(scores).__name__} values that are not numbers ({reason}); "
                          f"it must return one finite number per completion ({batch})")
    if values.shape != (batch,) or not np.all(np.isfinite(values)):
        raise RewardError(f"the {source} returned {values.shape} values (finite: {bool(np.all(np.isfinite(values)))}); "
                          f"it must return one finite number per completion ({batch})")
    return values
