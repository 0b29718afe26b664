"""A minimal, jittable PPO step with TRL's math (functions, not a trainer).

The formulas follow TRL's classic value-head `PPOTrainer` (TRL v0.11,
`trl/trainer/ppo_trainer.py` and `trl/core.py`): per-token rewards = -kl_coef * KL with
the score added at the last response token; GAE advantages with masked whitening;
clipped policy and value losses; a batch whose mean ratio exceeds `ratio_threshold`
contributes no gradient, and so does one without response tokens (NaN in TRL). All arrays
are float32 and every reduction is mask-aware.

Alignment (as TRL slices it): for ids [B, T], position t of the per-token arrays
[B, T-1] is the prediction of token t+1: `logprobs[:, t] = log p(ids[t+1] | ids[:t+1])`,
`values[:, t]` is the value at position t, and `mask[:, t] = response_mask[:, t+1]`,
where `response_mask` [B, T] marks the real response tokens. For seq2seq models the same
holds over the decoder ids (mark the decoder start token as not a response token;
unlike TRL, whose seq2seq masking also drops the first generated token, trlax keeps it).

Typical loop (see `make_rollout`, `make_ppo_update`):

    trainable, frozen = trlax.split_trainable(policy.params, policy.trainable_mask)
    rollout = make_rollout(policy, ref, config)
    update = make_ppo_update(policy, tx, config)
    opt_state, moments = tx.init(trainable), ScoreMoments()
    scores, moments = normalize_scores(raw_scores, moments, config)  # TRL's score scaling and clipping, if set
    exp = rollout(merge_trainable(trainable, frozen), ref.params, batch, scores, kl_coef)
    for minibatch in ...:                      # slices of `exp` along the batch axis
        trainable, opt_state, stats = update(trainable, frozen, opt_state, minibatch)
    policy.params = merge_trainable(trainable, frozen)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trlax.errors import InputError, TrlaxError, TrlaxTypeError
from trlax.inputs import check_shape, check_token_range, explained_device_mismatch, is_concrete, live_params
from trlax.trainable import jit_keeping_placement, merge_trainable, split_trainable
from trlax.value_head import PreTrainedModelWrapper

Array = jax.Array
KL_PENALTIES = ("kl", "abs", "mse", "full")


# What a settings field's annotation admits: `int` an int (not a bool), `float` any int or float (not a bool).
FIELD_KINDS: dict[type, Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}
_NAMED_KINDS: dict[str, Any] = {**{kind.__name__: kind for kind in FIELD_KINDS}, "None": type(None)}


def check_field_types(settings: Any) -> None:
    """TrlaxTypeError naming the first field of a settings dataclass whose value its annotation does not admit
    (`FIELD_KINDS`, a class, `X | None`; other annotations are not checked): a string "0.2" or "no" would
    otherwise fail deep in a run, or, for a bool, count as True. NumPy and JAX scalars become Python numbers
    first (the settings are saved as JSON with a training state)."""
    try:
        hints: dict[str, Any] | None = typing.get_type_hints(type(settings))
    except Exception:  # noqa: BLE001 - a subclass's annotation that does not resolve: read the text instead
        hints = None
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0:
            value = value.item()
            object.__setattr__(settings, field.name, value)  # frozen dataclasses too
        if hints is None:  # the annotation as written: "float | None", "PPOConfig"
            kinds = tuple(_NAMED_KINDS.get(kind.strip(), kind.strip()) for kind in str(field.type).split("|"))
        else:
            hint = hints.get(field.name)
            kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None and type(None) in kinds:
            continue
        if not any(_admits(kind, value) for kind in kinds):
            names = " or ".join("None" if kind is type(None) else getattr(kind, "__name__", str(kind))
                                for kind in kinds)
            raise TrlaxTypeError(f"{type(settings).__name__}.{field.name} must be {names}; got {value!r} "
                                 f"({type(value).__name__})")


def _admits(kind: Any, value: Any) -> bool:
    if kind in FIELD_KINDS:
        return FIELD_KINDS[kind](value)
    if isinstance(kind, str):  # a class named in an annotation that did not resolve
        return "[" in kind or kind in {cls.__name__ for cls in type(value).__mro__}
    if isinstance(kind, type) and typing.get_origin(kind) is None:
        return isinstance(value, kind)
    return True  # a generic annotation: not checked


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """TRL v0.11 PPOConfig's loss and reward settings, with its defaults."""

    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the old values
    vf_coef: float = 0.1  # value loss weight
    kl_penalty: str = "kl"  # "kl" | "abs" | "mse" | "full"
    whiten_rewards: bool = False
    ratio_threshold: float = 10.0  # skip a batch whose mean ratio exceeds this
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0  # adaptive KL target
    horizon: float = 10000.0  # adaptive KL horizon
    use_score_scaling: bool = False  # divide scores by their running std (`normalize_scores`)
    use_score_norm: bool = False  # and subtract their running mean first (needs use_score_scaling)
    score_clip: float | None = None  # then clip scores to [-score_clip, score_clip]

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kl_penalty not in KL_PENALTIES:
            raise TrlaxError(f"kl_penalty must be one of {KL_PENALTIES}; got {self.kl_penalty!r}")
        for name in ("target", "horizon"):  # the adaptive KL controller divides by both
            if not 0 < getattr(self, name) < math.inf:
                raise TrlaxError(f"{name} (the adaptive KL controller's) must be > 0; got {getattr(self, name)}")
        # NaN, inf or a sign error would train on nonsense, or diverge with a misleading message.
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrlaxError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        for name in ("vf_coef", "init_kl_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise TrlaxError(f"{name} must be a finite number >= 0; got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value", "ratio_threshold"):
            if not 0 < getattr(self, name) < math.inf:
                raise TrlaxError(f"{name} must be a finite number > 0; got {getattr(self, name)}")
        if self.score_clip is not None and not 0 < self.score_clip < math.inf:
            raise TrlaxError(f"score_clip must be a finite number > 0 (or None); got {self.score_clip}")
        if self.use_score_norm and not self.use_score_scaling:  # TRL ignores it then: the user expects it applied
            raise TrlaxError("use_score_norm applies only with use_score_scaling=True (TRL ignores it without); "
                             "set both to normalise scores by their running mean and std")


# --- core.py --------------------------------------------------------------------------
def masked_mean(values: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of `values` where `mask` is 1 (over `axis`, or everything); 0 where the mask is empty.

    TRL divides by the mask's sum unguarded, so a (mini)batch without response tokens gives
    NaN losses, NaN gradients and NaN params after the update; here it gives zero (and zero
    gradients). Any non-empty mask gives TRL's value exactly.
    """
    mask = mask.astype(jnp.float32)
    total = mask.sum(axis=axis)
    return (values * mask).sum(axis=axis) / jnp.where(total > 0, total, 1.0)


def masked_var(values: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of `values` where `mask` is 1; Bessel-corrected like TRL when `unbiased`.

    TRL raises on an all-zero mask; under jit that cannot be checked, so a mask sum of 0
    gives 0 (see `masked_mean`), and a mask sum of 1 NaN when unbiased (0 * 1/0, as TRL 1.12's `masked_var`;
    TRL 0.11's raises "The sum of the mask is one", as `check_rollout_inputs` does for a rollout).
    """
    mask = mask.astype(jnp.float32)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        total = mask.sum()
        variance = variance * total / (total - 1)
    return variance


def masked_whiten(values: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(values - mean) / sqrt(var + 1e-8) with masked statistics; keeps the mean if not shift_mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def clip_by_value(x: Array, low: Array, high: Array) -> Array:
    """TRL's `clip_by_value`: x clamped to [low, high] elementwise (arrays broadcasting together, any float
    dtype; the result has their broadcast shape)."""
    return jnp.maximum(jnp.minimum(x, high), low)


def logprobs_from_logits(logits: Array, labels: Array | None, gather: bool = True) -> Array:
    """log_softmax(logits [B, T, V]) in float32, gathered at labels [B, T] int -> [B, T] (or [B, T, V]).

    Labels must be ids of the vocabulary (InputError otherwise, checked when they are concrete): a gather
    wraps -1 to the last id and gives NaN past the end, where TRL's `torch.gather` raises."""
    logits = logits.astype(jnp.float32)
    if not gather:
        return jax.nn.log_softmax(logits, axis=-1)
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise InputError(f"labels must be integer token ids; got dtype {jnp.result_type(labels)}")
    check_shape("labels", labels, np.shape(logits)[:-1])
    check_token_range("labels", labels, np.shape(logits)[-1])
    # The label's logit minus the logsumexp, as TRL 1.12's `selective_log_softmax`: no [B, T, V] log-softmax.
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: Array) -> Array:
    """Entropy [B, T] of the softmax of logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


# --- rewards and advantages -----------------------------------------------------------
def kl_penalty(logprob: Array, ref_logprob: Array, kind: str = "kl") -> Array:
    """Per-token KL estimate [B, T] between the policy and the reference.

    "kl": logp - ref; "abs": |logp - ref|; "mse": 0.5 (logp - ref)^2 on the sampled
    tokens' log-probs [B, T]; "full": the exact KL(policy || ref) per token from full
    log-distributions [B, T, V] (`logprobs_from_logits(..., gather=False)`).
    """
    logprob, ref_logprob = logprob.astype(jnp.float32), ref_logprob.astype(jnp.float32)
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return jnp.abs(logprob - ref_logprob)
    if kind == "mse":
        return 0.5 * jnp.square(logprob - ref_logprob)
    if kind == "full":
        return jnp.sum(jnp.exp(logprob) * (logprob - ref_logprob), axis=-1)
    raise TrlaxError(f"kl_penalty must be one of {KL_PENALTIES}; got {kind!r}")


def check_scores_shape(scores: Any, batch: int) -> None:
    """InputError unless `scores` is [batch], one per sequence (a [B, 1] score broadcasts into [B, B, T])."""
    if np.shape(scores) != (batch,):
        raise InputError(f"scores must be [B] = ({batch},), one per sequence; got {np.shape(scores)} (a 1-label "
                         "reward model's logits [B, 1]: pass logits[:, 0])")


def compute_rewards(
    scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, kl_coef: float | Array, kind: str = "kl"
) -> tuple[Array, Array, Array]:
    """TRL's per-token rewards: (rewards, non_score_rewards, kls), each [B, T] float32.

    non_score_rewards = -kl_coef * kl_penalty(...); rewards adds scores [B] at each
    row's last position where mask [B, T] is 1 (rows with an empty mask get no score;
    TRL raises there). logprobs/ref_logprobs: [B, T], or [B, T, V] for kind="full". Other shapes raise
    InputError (a [B, 1] score broadcast into [B, B, T] rewards).
    """
    check_mask_and_scores(mask, scores)
    want = (*np.shape(mask), *(np.shape(logprobs)[-1:] if kind == "full" else ()))  # "full": [B, T, V]
    for name, value in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if np.shape(value) != want or len(want) != 2 + (kind == "full"):
            raise InputError(f"{name} must be {'[B, T, V] log-distributions' if kind == 'full' else '[B, T]'} "
                             f"for kl_penalty={kind!r} with a [B, T] = {np.shape(mask)} mask; got {np.shape(value)}")
    return rewards_from_kls(scores, kl_penalty(logprobs, ref_logprobs, kind), mask, kl_coef)


def check_mask_and_scores(mask: Array, scores: Array) -> None:
    """InputError unless mask is [B, T] and scores [B]."""
    if np.ndim(mask) != 2:
        raise InputError(f"mask must be [B, T] (1 at the response's log-prob positions); got {np.shape(mask)}")
    check_scores_shape(scores, np.shape(mask)[0])


def rewards_from_kls(scores: Array, kls: Array, mask: Array, kl_coef: float | Array) -> tuple[Array, Array, Array]:
    """`compute_rewards` from the per-token KL penalties kls [B, T] float32 (`kl_penalty`'s): (rewards,
    non_score_rewards, kls), each [B, T] float32. Shapes other than mask's for kls raise InputError."""
    check_mask_and_scores(mask, scores)
    if np.shape(kls) != np.shape(mask):
        raise InputError(f"kls must be [B, T] = {np.shape(mask)}, one penalty per mask position; got {np.shape(kls)}")
    non_score = -kl_coef * kls
    valid = mask > 0
    t = valid.shape[-1]
    last = t - 1 - jnp.argmax(valid[:, ::-1], axis=-1)  # [B] index of the last valid position
    at_last = jax.nn.one_hot(last, t, dtype=jnp.float32) * valid.any(axis=-1, keepdims=True).astype(jnp.float32)
    rewards = non_score + at_last * scores.astype(jnp.float32)[:, None]
    return rewards, non_score, kls


@dataclasses.dataclass(frozen=True)
class ScoreMoments:
    """TRL's `RunningMoments` of every score seen so far, as Python floats (TRL starts at mean 0, var and std 1,
    count 1e-24, so the first batch's own statistics replace the start)."""

    mean: float = 0.0
    var: float = 1.0  # biased (population) variance of the scores so far
    std: float = 1.0  # unbiased std of the scores so far
    count: float = 1e-24

    def update(self, scores: np.ndarray) -> ScoreMoments:
        """The moments after one more batch of scores [B] (any float dtype; merged in float64).

        TRL's `RunningMoments.update`: Chan et al.'s merge of the batch's biased variance into the running one.
        InputError for non-finite scores (they would poison every later step) and for a first batch of one score
        (TRL's std is then sqrt(x / 0) = inf and every score of the step becomes 0)."""
        scores = np.asarray(scores, np.float64).reshape(-1)
        if scores.size == 0:
            raise InputError("score scaling got an empty batch of scores; pass one score per sequence")
        if not np.isfinite(scores).all():
            raise InputError(f"score scaling needs finite scores; got {scores.tolist()}")
        n, batch_mean, batch_var = scores.size, float(scores.mean()), float(scores.var())
        total = self.count + n
        if total - 1 <= 0:
            raise InputError("score scaling's running std divides by (scores seen - 1): the first batch needs at "
                             "least 2 scores (TRL gives inf there and zeroes every score)")
        delta = batch_mean - self.mean
        var = (self.var * self.count + delta**2 * self.count * n / total + batch_var * n) / total
        return ScoreMoments(mean=self.mean + delta * n / total, var=var, std=math.sqrt(var * total / (total - 1)),
                            count=total)


def normalize_scores(scores: np.ndarray, moments: ScoreMoments, config: PPOConfig) -> tuple[np.ndarray, ScoreMoments]:
    """TRL's score scaling and clipping at the start of `step`: (the scores [B] float32 PPO trains on, the moments).

    With `use_score_scaling`, the moments first take this batch (`ScoreMoments.update`), then scores are divided
    by `std + eps` (float32's eps), after subtracting `mean` with `use_score_norm`; with `score_clip`, they are
    clipped to [-score_clip, score_clip]. Neither set: the scores as float32, the moments unchanged.
    A host function (NumPy, float64). InputError where every score so far is the same non-zero value and
    `use_score_norm` is off: the running std is then ~0 and TRL multiplies the scores by ~1 / eps (8e6)."""
    scores = np.asarray(scores, np.float64)
    if config.use_score_scaling:
        moments = moments.update(scores)
        no_spread = moments.std <= np.finfo(np.float32).eps * max(1.0, abs(moments.mean))
        if no_spread and not config.use_score_norm and np.any(scores != 0):
            raise InputError(f"score scaling: every score so far is {moments.mean:.6g} (running std "
                             f"{moments.std:.3g}), so dividing by the std would multiply them by ~1 / eps; use "
                             "use_score_norm (they become 0), a reward with spread, or no score scaling")
        shift = moments.mean if config.use_score_norm else 0.0
        scores = (scores - shift) / (moments.std + float(np.finfo(np.float32).eps))
    if config.score_clip is not None:
        scores = np.clip(scores, -config.score_clip, config.score_clip)
    return scores.astype(np.float32), moments


def compute_advantages(
    values: Array, rewards: Array, mask: Array, gamma: float, lam: float, whiten_rewards: bool = False
) -> tuple[Array, Array, Array]:
    """GAE as TRL computes it: (masked values, whitened advantages, returns), each [B, T].

    Values and rewards are zeroed outside the mask first; the bootstrap value after the
    last position is 0; advantages are whitened over the mask and carry no gradient;
    returns = advantages + values (before whitening).
    """
    mask = mask.astype(jnp.float32)
    values = values.astype(jnp.float32) * mask
    rewards = rewards.astype(jnp.float32) * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values  # [B, T]

    def step(carry: Array, delta: Array) -> tuple[Array, Array]:
        gae = delta + gamma * lam * carry
        return gae, gae

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)  # [T, B]
    advantages = advantages.T
    returns = advantages + values
    advantages = jax.lax.stop_gradient(masked_whiten(advantages, mask))
    return values, advantages, returns


# --- losses ---------------------------------------------------------------------------
def ppo_loss(
    old_logprobs: Array, values: Array, logits: Array, vpreds: Array, logprobs: Array, mask: Array,
    advantages: Array, returns: Array, config: PPOConfig,
) -> tuple[Array, Array, dict[str, Array]]:
    """TRL's `loss`: (pg_loss, vf_coef * vf_loss, stats) as float32 scalars.

    old_logprobs, values (old, masked), vpreds, logprobs, advantages, returns, mask:
    [B, T]; logits [B, T, V] (for the entropy statistic). A batch whose masked mean ratio
    exceeds `config.ratio_threshold` gives zero losses (TRL skips it); so does a batch without
    response tokens (an empty `mask`, where TRL's losses are NaN). Both count as skipped.
    """
    vpred_clipped = clip_by_value(vpreds, values - config.cliprange_value, values + config.cliprange_value)
    vf_losses1 = jnp.square(vpreds - returns)
    vf_losses2 = jnp.square(vpred_clipped - returns)
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(jnp.float32), mask)

    ratio = jnp.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - config.cliprange, 1.0 + config.cliprange)
    pg_loss = masked_mean(jnp.maximum(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).astype(jnp.float32), mask)

    avg_ratio = masked_mean(ratio, mask)
    skipped = (avg_ratio > config.ratio_threshold) | (mask.sum() == 0)
    pg_loss = jnp.where(skipped, 0.0, pg_loss)
    vf_loss = jnp.where(skipped, 0.0, vf_loss)
    loss = pg_loss + config.vf_coef * vf_loss

    stop = jax.lax.stop_gradient
    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
        "policy/entropy": masked_mean(entropy_from_logits(logits), mask),
        "policy/approxkl": 0.5 * masked_mean(jnp.square(logprobs - old_logprobs), mask),
        "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac, "policy/advantages_mean": masked_mean(advantages, mask),
        "policy/ratio_mean": avg_ratio, "policy/skipped": skipped.astype(jnp.float32),
        "returns/mean": masked_mean(returns, mask), "returns/var": masked_var(returns, mask),
        "val/vpred": masked_mean(vpreds, mask), "val/error": masked_mean(jnp.square(vpreds - returns), mask),
        "val/clipfrac": vf_clipfrac, "val/mean": masked_mean(values, mask), "val/var": masked_var(values, mask),
    }
    return pg_loss, config.vf_coef * vf_loss, {k: stop(v) for k, v in stats.items()}


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_steps: int, target: float, horizon: float) -> float:
    """TRL's AdaptiveKLController update: scale by 1 + clip(kl / target - 1, +-0.2) * n_steps / horizon.

    InputError for a non-finite KL (the coefficient would stay NaN for the rest of the run) and for a target or
    horizon that is not > 0."""
    if not math.isfinite(current_kl):
        raise InputError(f"adaptive_kl_coef needs the step's finite KL; got {current_kl}")
    if not (target > 0 and horizon > 0):
        raise InputError(f"adaptive_kl_coef needs target > 0 and horizon > 0; got target={target}, horizon={horizon}")
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


# --- model glue -----------------------------------------------------------------------
# The batch entries `forward` reads ([B, T] each; position_ids optional, the decoder's for seq2seq only).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids", "decoder_attention_mask")


def forward(
    model: PreTrainedModelWrapper, params: dict[str, Any], batch: dict[str, Array], *, train: bool = False,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array, Array]:
    """(logprobs [B, T-1], logits [B, T-1, V], values [B, T-1]) sliced as TRL's batched forward.

    batch: "input_ids", "attention_mask" [B, T] (causal; optional "position_ids"), or
    additionally "decoder_input_ids", "decoder_attention_mask" [B, T] (seq2seq; T is the
    decoder length). Logits and values at position t predict token t+1.
    """
    if model.pretrained_model.is_encoder_decoder:
        ids = batch["decoder_input_ids"]
        logits, _, values = model.apply(params, batch["input_ids"], batch["attention_mask"], ids,
                                        batch["decoder_attention_mask"], dropout_rng=dropout_rng, train=train)
    else:
        ids = batch["input_ids"]
        logits, _, values = model.apply(params, ids, batch["attention_mask"], batch.get("position_ids"),
                                        dropout_rng=dropout_rng, train=train)
    logits = logits[:, :-1]
    return logprobs_from_logits(logits, ids[:, 1:]), logits, values[:, :-1]


def logprob_mask(response_mask: Array) -> Array:
    """Mask [B, T-1] over logprob positions from a response-token mask [B, T] (t predicts t+1)."""
    return response_mask[:, 1:].astype(jnp.float32)


def as_arrays(batch: Any) -> Any:
    """A batch (any mapping) whose entries may be lists or (CPU) torch tensors, as the forwards take them: a dict
    of those as NumPy arrays and of NumPy and JAX arrays as they are. Anything else is returned for
    `check_model_batch` to refuse."""
    if not isinstance(batch, Mapping):
        return batch
    return {k: v if isinstance(v, (np.ndarray, jax.Array)) else np.asarray(v) for k, v in batch.items()}


def check_model_batch(model: PreTrainedModelWrapper, batch: dict[str, Array], needed: tuple[str, ...],
                      what: str, hint: str = "") -> Array:
    """InputError unless `batch` holds the model inputs `forward` reads plus `needed`, the ids checked as the
    model's forward checks them (in the vocabulary when concrete: the jitted step would give NaN log-probs) with
    masks of their shape. Returns the ids log-probs are scored on ([B, T]: the decoder's for seq2seq)."""
    if not isinstance(batch, Mapping):  # a dict, or a flax FrozenDict
        raise TrlaxTypeError(f"the {what} must be a dict of arrays; got {type(batch).__name__}")
    lm = model.pretrained_model
    seq2seq = lm.is_encoder_decoder
    needed = ("input_ids", "attention_mask", *(("decoder_input_ids", "decoder_attention_mask") if seq2seq else ()),
              *needed)
    missing = [key for key in needed if key not in batch]
    if missing:
        raise InputError(f"the {what} has no {missing}: it needs {list(needed)}{hint}")
    if seq2seq:
        lm.check_inputs(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                        batch["decoder_attention_mask"])
    else:
        lm.check_inputs(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    return batch["decoder_input_ids" if seq2seq else "input_ids"]


def check_rollout_inputs(model: PreTrainedModelWrapper, batch: dict[str, Array], scores: Array,
                         kl_coef: Any = 0.0) -> None:
    """InputError unless `batch` holds what `make_rollout` reads (`check_model_batch`, and a 0/1 response_mask
    [B, T] on real tokens), `scores` is [B] and, where concrete, scores and `kl_coef` are finite numbers and the
    batch holds at least 2 response tokens after the first position, which whitening the advantages needs (TRL
    0.11 raises "The sum of the mask is one"). Each of these gave NaN advantages, then NaN params after the update.

    A [B, 1] score (a 1-label reward model's logits) broadcast into [B, B, T-1] advantages without an error;
    a missing key gave a bare KeyError inside the trace."""
    scored = check_model_batch(model, batch, ("response_mask",), "rollout batch", " (response_mask [B, T]: 1 at "
                               "the reply's tokens, over the decoder ids for an encoder-decoder)")
    response = batch["response_mask"]
    check_shape("response_mask", response, np.shape(scored))
    check_scores_shape(scores, np.shape(scored)[0])
    for name, value in (("scores", scores), ("kl_coef", kl_coef)):
        if is_concrete(value):
            values = np.asarray(value)
            if not (jnp.issubdtype(values.dtype, jnp.number) or values.dtype == np.bool_) or not np.isfinite(
                    values.astype(np.float64)).all():  # float64 also holds ml_dtypes' bfloat16
                raise InputError(f"{name} must be finite numbers; got {values.tolist()} (a NaN or inf makes every "
                                 "advantage NaN, and the update NaN params)")
    if is_concrete(response):
        response = np.asarray(response)
        attention = np.asarray(batch["decoder_attention_mask" if model.pretrained_model.is_encoder_decoder
                                     else "attention_mask"])
        if not np.isin(response, (0, 1)).all() or (response > attention).any():
            raise InputError("response_mask must hold 1 at the reply's tokens and 0 elsewhere (never on padding)")
        if response[:, 1:].sum() < 2:
            raise InputError(f"the rollout batch has {int(response[:, 1:].sum())} response token(s) after the first "
                             "position: whitening the advantages needs at least 2 (TRL raises 'The sum of the mask "
                             "is one'); score longer replies or more of them")


def check_ppo_models(policy: Any, reference: Any, config: Any) -> None:
    """TrlaxTypeError unless policy and reference (None: none) are value-head wrappers and config a PPOConfig."""
    for name, model in (("policy", policy), ("reference", reference)):
        if model is not None and not isinstance(model, PreTrainedModelWrapper):
            raise TrlaxTypeError(f"the {name} must be a value-head model (FlaxAutoModelForCausalLMWithValueHead or "
                                 f"...Seq2SeqLMWithValueHead; a reference: create_reference_model(policy)); got "
                                 f"{type(model).__name__}")
    if not isinstance(config, PPOConfig):
        raise TrlaxTypeError(f"config must be a trlax.ppo.PPOConfig (PPOConfig(**settings)); got "
                             f"{type(config).__name__}")


def in_row_chunks(fn: Callable[[dict[str, Array]], Any], batch: dict[str, Array], size: int | None) -> Any:
    """`fn(batch)` computed over chunks of `size` rows one after another (`jax.lax.map`), so only one chunk's
    activations are alive at a time; `fn` must treat rows independently. Its outputs (leading dim = rows) come
    back in row order. Chunk i holds rows i, i + n, i + 2n, ...: on a mesh each chunk spans every data shard.
    size None, or at least the batch: one call."""
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if size is None or size >= rows:
        return fn(batch)
    n, rest = divmod(rows, size)
    chunks = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x[:n * size].reshape(size, n, *x.shape[1:]), 0, 1),
                                    batch)
    out = jax.tree_util.tree_map(lambda y: jnp.swapaxes(y, 0, 1).reshape(n * size, *y.shape[2:]),
                                 jax.lax.map(fn, chunks))
    if rest:
        tail = fn(jax.tree_util.tree_map(lambda x: x[n * size:], batch))
        out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return out


def make_rollout(
    policy: PreTrainedModelWrapper, reference: PreTrainedModelWrapper, config: PPOConfig = PPOConfig(),
    forward_batch_size: int | None = None,
) -> Callable[..., dict[str, Array]]:
    """`rollout(policy_params, ref_params, batch, scores, kl_coef) -> experience`, jit-compiled (its batch keys
    and shapes checked first, `check_rollout_inputs`).

    The part of TRL's `step` before the PPO epochs: policy and reference forwards (no
    gradients), `compute_rewards`, `compute_advantages`. batch: the model inputs (see
    `forward`) plus "response_mask" [B, T] (1 = real response token); scores [B] float.
    The experience is the batch plus "mask", "old_logprobs", "ref_logprobs",
    "old_values", "rewards", "non_score_rewards", "kls", "advantages", "returns" (all
    [B, T-1] float32): exactly what `make_ppo_update`'s step reads.

    forward_batch_size: run the forwards over chunks of this many rows (TRL's `batched_forward_pass` uses
    `mini_batch_size`), so their [B, T, V] logits never exist whole; with kl_penalty "full" each chunk's
    KL is summed over the vocabulary there, so the two log-softmaxes never do either (TRL's do); None: the
    whole batch at once.
    """
    check_ppo_models(policy, reference, config)
    if forward_batch_size is not None and (not isinstance(forward_batch_size, int) or forward_batch_size < 1):
        raise TrlaxError(f"forward_batch_size must be a positive int or None; got {forward_batch_size!r}")
    full_kl = config.kl_penalty == "full"

    def forwards(policy_params: dict[str, Any], ref_params: dict[str, Any],
                 rows: dict[str, Array]) -> tuple[Array, ...]:
        logprobs, logits, values = forward(policy, jax.lax.stop_gradient(policy_params), rows)
        ref_logprobs, ref_logits, _ = forward(reference, ref_params, rows)
        if full_kl:  # the exact KL per token [b, T-1], from the chunk's log-softmaxes [b, T-1, V]
            kls = kl_penalty(logprobs_from_logits(logits, None, gather=False),
                             logprobs_from_logits(ref_logits, None, gather=False), "full")
        else:
            kls = kl_penalty(logprobs, ref_logprobs, config.kl_penalty)
        return logprobs, ref_logprobs, values, kls

    def rollout(policy_params: dict[str, Any], ref_params: dict[str, Any], batch: dict[str, Array],
                scores: Array, kl_coef: Array) -> dict[str, Array]:
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        logprobs, ref_logprobs, values, kls = in_row_chunks(
            lambda rows: forwards(policy_params, ref_params, rows), inputs, forward_batch_size)
        mask = logprob_mask(batch["response_mask"])
        rewards, non_score, kls = rewards_from_kls(scores, kls, mask, kl_coef)
        values, advantages, returns = compute_advantages(values, rewards, mask, config.gamma, config.lam,
                                                         config.whiten_rewards)
        return {**batch, "mask": mask, "old_logprobs": logprobs, "ref_logprobs": ref_logprobs, "old_values": values,
                "rewards": rewards, "non_score_rewards": non_score, "kls": kls, "advantages": advantages,
                "returns": returns}

    jitted = jax.jit(rollout)

    def checked_rollout(policy_params: dict[str, Any], ref_params: dict[str, Any], batch: dict[str, Array],
                        scores: Array, kl_coef: Array) -> dict[str, Array]:
        batch = as_arrays(batch)
        check_rollout_inputs(policy, batch, scores, kl_coef)
        with (explained_device_mismatch("the rollout (policy and reference: shard the policy before "
                                        "create_reference_model, so the reference shares its mesh)"),
              live_params((policy_params, ref_params), "the policy_params or ref_params of the rollout")):
            # float32 as the docstring says, also for float64 scores or kl_coef under jax_enable_x64
            return jitted(policy_params, ref_params, batch, jnp.asarray(scores, jnp.float32),
                          jnp.asarray(kl_coef, jnp.float32))

    return checked_rollout


# What `make_ppo_update`'s step reads from `make_rollout`'s experience besides the model inputs: [B, T-1] each.
EXPERIENCE_KEYS = ("mask", "old_logprobs", "old_values", "advantages", "returns")


def check_experience(model: PreTrainedModelWrapper, batch: dict[str, Array]) -> None:
    """InputError unless a (mini)batch holds the model inputs and `EXPERIENCE_KEYS` [B, T-1] of `make_rollout`'s
    experience: a [1, T-1] advantages row broadcast over the batch without an error, ids past the vocabulary
    gave NaN params, a missing key a bare KeyError inside the trace."""
    scored = check_model_batch(model, batch, EXPERIENCE_KEYS, "minibatch", " (rows of make_rollout's experience)")
    batch_size, length = np.shape(scored)
    for key in EXPERIENCE_KEYS:
        if np.shape(batch[key]) != (batch_size, length - 1):
            raise InputError(f"minibatch[{key!r}] must be [B, T-1] = {(batch_size, length - 1)} for ids of shape "
                             f"{(batch_size, length)}; got {np.shape(batch[key])} (take the same rows of every "
                             "entry of make_rollout's experience)")


def trained_but_frozen(mask: Any, model: PreTrainedModelWrapper) -> list[str]:
    """The paths of the leaves `mask` (a bool per param leaf) trains that `model.trainable_mask` freezes."""
    return [jax.tree_util.keystr(path) for (path, trains), allowed in zip(
        jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree_util.tree_leaves(model.trainable_mask), strict=True)
        if trains and not allowed]


def make_ppo_update(
    model: PreTrainedModelWrapper, tx: optax.GradientTransformation, config: PPOConfig = PPOConfig(),
    mask: Any = None,
) -> Callable[..., tuple[Any, Any, dict[str, Array]]]:
    """`update(trainable, frozen, opt_state, batch, rng=None) -> (trainable, opt_state, stats)`.

    One optimizer step on TRL's loss (pg_loss + vf_coef * vf_loss) for a (mini)batch of
    `make_rollout`'s experience, jit-compiled with `trainable` and `opt_state` donated; on a mesh the new
    `trainable` and `opt_state` keep the placement of the ones passed in (`trlax.trainable.jit_keeping_placement`).
    `trainable, frozen = split_trainable(model.params, mask)` (mask default
    `model.trainable_mask`); `opt_state = tx.init(trainable)`, so frozen leaves (shared
    with a reference model) are neither donated nor given optimizer state. `rng`: a
    dropout key (None = deterministic forward). Passing the whole params as `trainable`
    is refused with a ValueError, since donating shared leaves would delete the
    reference model's arrays.
    """
    check_ppo_models(model, None, config)
    mask = model.trainable_mask if mask is None else mask
    expected, expected_frozen = (jax.tree_util.tree_structure(half) for half in split_trainable(model.params, mask))
    unfrozen = trained_but_frozen(mask, model)
    if unfrozen:
        raise TrlaxError(f"mask trains {len(unfrozen)} param(s) that model.trainable_mask freezes, e.g. "
                         f"{unfrozen[0]}: frozen leaves are shared with a reference model (or are a LoRA policy's "
                         "base, its reference), and the update donates what it trains, which would delete the "
                         "reference's arrays; keep those leaves False in mask")

    def loss_fn(trainable: Any, frozen: Any, batch: dict[str, Array], rng: Array | None) -> tuple[Array, Any]:
        params = merge_trainable(trainable, frozen)
        logprobs, logits, vpreds = forward(model, params, batch, train=rng is not None, dropout_rng=rng)
        pg_loss, vf_loss, stats = ppo_loss(batch["old_logprobs"], batch["old_values"], logits, vpreds, logprobs,
                                           batch["mask"], batch["advantages"], batch["returns"], config)
        return pg_loss + vf_loss, stats

    def update(trainable: Any, frozen: Any, opt_state: Any, batch: dict[str, Array],
               rng: Array | None) -> tuple[Any, Any, dict[str, Array]]:
        grads, stats = jax.grad(loss_fn, has_aux=True)(trainable, frozen, batch, rng)
        # optax is written for JAX's standard promotion (0.2.8's Adam raises under "strict": its bias correction
        # raises a float to an int32 step count); trlax's own code holds to whichever the user set
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, stats

    jitted = jit_keeping_placement(update, kept=(0, 2), outputs=3, donate_argnums=(0, 2))

    def step(trainable: Any, frozen: Any, opt_state: Any, batch: dict[str, Array],
             rng: Array | None = None) -> tuple[Any, Any, dict[str, Array]]:
        newly_frozen = trained_but_frozen(mask, model)
        if newly_frozen:
            raise TrlaxError(
                f"model.trainable_mask now freezes {len(newly_frozen)} param(s) this update trains, e.g. "
                f"{newly_frozen[0]}: create_reference_model after make_ppo_update shares (and freezes) them, and "
                "the update would donate them, deleting the reference's arrays; call make_ppo_update (and "
                "split_trainable, tx.init) again after create_reference_model")
        if jax.tree_util.tree_structure(trainable) != expected:
            raise TrlaxError(
                "`trainable` must be split_trainable(params, model.trainable_mask)[0]: the update donates it, and "
                "donating leaves that are frozen (shared with a reference model) would delete the reference's "
                "arrays. Split the params with trlax.split_trainable and pass the frozen half separately.")
        if jax.tree_util.tree_structure(frozen) != expected_frozen:
            raise TrlaxError("`frozen` must be split_trainable(params, model.trainable_mask)[1], the half the update "
                             "does not train (a tree of the params' structure, None at the trainable leaves)")
        batch = as_arrays(batch)
        check_experience(model, batch)
        with live_params((trainable, frozen, opt_state), "the trainable, frozen or opt_state of the update"):
            return jitted(trainable, frozen, opt_state, batch, rng)

    return step
