"""The PPO training loop behind `trlax ppo`: TRL's classic PPO (`trlax.ppo`) over prompts, with crash-safe state.

One step, as TRL's classic `PPOTrainer.step`: take `batch_size` prompts (`trlax.ppo_data`),
sample replies (jitted generation with a KV cache), score them (`trlax.ppo_rewards`; scaled and
clipped as TRL's `use_score_scaling` / `use_score_norm` / `score_clip` say), then
one jitted `learn`: policy and reference forwards, per-token KL penalty with the score at the
last reply token, GAE, and `ppo_epochs` passes over shuffled minibatches of
`mini_batch_size` (clipped policy + value loss, Adam). The KL coefficient is fixed or TRL's
adaptive controller.

Determinism and resuming: the prompts, the generation key and the minibatch order of step s
are functions of (seed, s) alone, so the whole run is a function of the seed. `save_every`
writes an Orbax state (`trlax.checkpoint.state`: the trainable params, the optimizer state,
the base RNG key, the step, the KL coefficient, the running score moments and the data position)
after every N steps; `resume` restores the latest and continues, ending with bit-identical params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trlax.checkpoint.state import StateCheckpointer
from trlax.errors import TrlaxError
from trlax.generation import check_sampling
from trlax.ppo import (
    PPOConfig,
    ScoreMoments,
    adaptive_kl_coef,
    check_field_types,
    make_ppo_update,
    make_rollout,
    normalize_scores,
)
from trlax.ppo_data import PromptSet, TextCodec
from trlax.ppo_rewards import Generated, checked_scores
from trlax.sharding import committed
from trlax.trainable import jit_keeping_placement, merge_trainable, split_trainable
from trlax.value_head import PreTrainedModelWrapper

Array = jax.Array
STATE_DIR = "state"


class DivergedError(TrlaxError):
    """A PPO step made the policy's params or its losses NaN or inf (training diverged)."""


def check_seed(seed: int) -> None:
    """TrlaxError unless `seed` is an int in [0, 2**32), which numpy's and jax's generators both take."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise TrlaxError(f"--seed must be an integer in [0, 2**32); got {seed!r}")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Run settings; the loss settings are TRL's `PPOConfig` (`trlax.ppo.PPOConfig`)."""

    steps: int = 100
    batch_size: int = 128
    mini_batch_size: int = 128
    ppo_epochs: int = 4
    learning_rate: float = 1.41e-5
    max_grad_norm: float | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    save_every: int | None = None
    gradient_checkpointing: bool = False  # the policy's `gradient_checkpointing_enable()`: memory, not results
    ppo: PPOConfig = PPOConfig()

    def __post_init__(self) -> None:
        check_field_types(self)
        check_seed(self.seed)
        for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                unset = " (or unset: no state saved)" if name == "save_every" else ""
                raise TrlaxError(f"--{name.replace('_', '-')} must be >= 1{unset}; got {getattr(self, name)}")
        check_sampling(self.temperature, self.top_k, self.top_p)  # before any model loads
        if not 0 < self.learning_rate < math.inf:
            raise TrlaxError(f"--learning-rate must be a finite number > 0; got {self.learning_rate}")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise TrlaxError(f"--max-grad-norm must be a finite number > 0 (or unset); got {self.max_grad_norm}")
        if self.batch_size * self.max_new_tokens < 2:
            raise TrlaxError("--batch-size 1 with --max-new-tokens 1: advantages are whitened over the batch's reply "
                             "tokens, and one token has no variance; raise either")
        if self.batch_size == 1 and self.ppo.use_score_scaling:
            raise TrlaxError("--batch-size 1 with --use-score-scaling: the running std of the scores divides by the "
                             "number seen - 1, which the first batch of one makes 0 (TRL zeroes every score then); "
                             "use --batch-size 2 or more")
        if self.batch_size % self.mini_batch_size:
            raise TrlaxError(f"--batch-size {self.batch_size} must be a multiple of --mini-batch-size "
                             f"{self.mini_batch_size}")


@dataclasses.dataclass
class Models:
    """What a run trains and how it reads and scores text."""

    policy: PreTrainedModelWrapper
    reference: PreTrainedModelWrapper
    codec: TextCodec
    pad_id: int
    eos_ids: tuple[int, ...]
    reward: Callable[[Generated], np.ndarray]  # a trlax.ppo_rewards source
    description: dict[str, str]
    tokenizer: Any = None  # a transformers tokenizer to save beside the final policy, if any


# TrainerConfig fields a resumed run may change: how long, how often it saves, how it spends memory.
FREE_ON_RESUME = ("steps", "save_every", "gradient_checkpointing")


def run_settings(config: TrainerConfig) -> dict[str, Any]:
    """The settings of `config` a resumed run must keep (all but `FREE_ON_RESUME`), as JSON values."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_ON_RESUME}))


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`saved` settings (nested dicts) with the keys only `defaults` has added at their default values."""
    return {**defaults, **{k: with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict)
                           else v for k, v in saved.items()}}


def dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings flattened to dotted names ({"ppo": {"gamma": 1.0}} -> {"ppo.gamma": 1.0})."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        out.update(dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def random_settings() -> dict[str, Any]:
    """The JAX settings random numbers depend on besides the key (an embedded model's random init, the sampling
    keys' derivation): a resumed run must draw with the ones its state was trained with."""
    return {"prng_impl": str(jax.config.jax_default_prng_impl),
            "threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}


def reply_mask(reply: Array, eos_ids: tuple[int, ...]) -> Array:
    """[B, N] int32: 1 for reply tokens up to and including the first eos (all ones without eos ids)."""
    is_eos = jnp.zeros(reply.shape, bool)
    for eos in eos_ids:
        is_eos = is_eos | (reply == eos)
    is_eos = is_eos.astype(jnp.int32)
    return (jnp.cumsum(is_eos, axis=1) - is_eos == 0).astype(jnp.int32)


class PPOTrainer:
    """`trainer.step()` runs one PPO step and returns its metrics; `trainer.params` is the policy's pytree.

    run: what else defines the run besides `config` (the CLI's model, reward and prompt flags), JSON values;
    saved with every state, and a resume with other settings (`config` but `FREE_ON_RESUME`, or `run`) is
    refused. With `config.gradient_checkpointing` the policy's blocks are recomputed in the learn step's
    backward pass (`gradient_checkpointing_enable()`).
    """

    def __init__(self, models: Models, prompts: PromptSet, config: TrainerConfig,
                 run: dict[str, Any] | None = None) -> None:
        self.models, self.prompts, self.config = models, prompts, config
        self.run_settings = {**run_settings(config), **json.loads(json.dumps(run or {}))}  # as a saved state holds them
        policy = models.policy
        if config.batch_size == 1 and models.eos_ids:
            raise TrlaxError(f"--batch-size 1 with a policy whose replies end at eos {list(models.eos_ids)}: a reply "
                             "that is eos at its first token leaves one reply token in the batch, and advantages are "
                             "whitened over the batch's reply tokens (one token has no variance); use --batch-size 2 "
                             "or more")
        lm = policy.pretrained_model
        positions, length = lm.spec.position_limit(lm.config), prompts.ids.shape[1] + config.max_new_tokens
        if positions is not None and length > positions:  # the learn step reads every prompt + reply token
            raise TrlaxError(f"the policy has {positions} positions, but a prompt of {prompts.ids.shape[1]} tokens "
                             f"+ {config.max_new_tokens} new ones is {length}; lower --max-prompt-length or "
                             "--max-new-tokens")
        adam = optax.adam(config.learning_rate)
        self.tx = adam if config.max_grad_norm is None else optax.chain(
            optax.clip_by_global_norm(config.max_grad_norm), adam)
        trainable, self.frozen = split_trainable(policy.params, policy.trainable_mask)
        self.mesh = lm.mesh  # leaves off it (Adam's step count, a restored RNG key) are replicated over it
        self.set_state(committed(trainable, self.mesh), committed(self.tx.init(trainable), self.mesh))
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        # The forwards run in minibatch-sized chunks, as TRL's batched_forward_pass: memory follows the minibatch.
        self.rollout = make_rollout(policy, models.reference, config.ppo, forward_batch_size=config.mini_batch_size)
        self.update = make_ppo_update(policy, self.tx, config.ppo)
        self.learn = jit_keeping_placement(self._learn, kept=(0, 2), outputs=4, donate_argnums=(0, 2))
        self.key = jax.random.key(config.seed)  # the base key: step s uses fold_in(key, s)
        self.step_index = 0
        self.kl_coef = float(config.ppo.init_kl_coef)
        self.score_moments = ScoreMoments()  # TRL's running score statistics (used with use_score_scaling)

    @property
    def params(self) -> dict[str, Any]:
        return merge_trainable(self.trainable, self.frozen)

    def set_state(self, trainable: Any, opt_state: Any) -> None:
        """Take these trainable params and optimizer state, and give the policy the params they make: each step
        donates the previous trainable arrays, so the policy holds the current ones between steps (for a reward
        function, an `on_step` callback, or after an interrupted `train`)."""
        self.trainable, self.opt_state = trainable, opt_state
        self.models.policy.params = self.params

    # --- one step -------------------------------------------------------------------------
    def _learn(self, trainable: Any, frozen: Any, opt_state: Any, ref_params: Any, sequences: Array,
               prompt_mask: Array, scores: Array, trained_scores: Array, kl_coef: Array, order: Array,
               ) -> tuple[Any, Any, dict[str, Array], Array]:
        """The step's updates: (trainable, opt_state, metrics, whether every updated trainable param is finite).

        scores [B]: the reward's (for the metrics); trained_scores [B]: after TRL's scaling and clipping."""
        p = prompt_mask.shape[1]
        reply = reply_mask(sequences[:, p:], self.models.eos_ids)
        attention = jnp.concatenate([prompt_mask, reply], axis=1)
        batch = {"input_ids": sequences, "attention_mask": attention,
                 "position_ids": jnp.maximum(jnp.cumsum(attention, axis=1) - 1, 0),
                 "response_mask": jnp.concatenate([jnp.zeros_like(prompt_mask), reply], axis=1)}
        experience = self.rollout(merge_trainable(trainable, frozen), ref_params, batch, trained_scores, kl_coef)

        def minibatch_update(carry: tuple[Any, Any], rows: Array) -> tuple[tuple[Any, Any], dict[str, Array]]:
            minibatch = jax.tree_util.tree_map(lambda x: x[rows], experience)
            trainable, opt_state, stats = self.update(carry[0], frozen, carry[1], minibatch)
            return (trainable, opt_state), stats

        (trainable, opt_state), stats = jax.lax.scan(minibatch_update, (trainable, opt_state), order)
        mask = experience["mask"]
        metrics = {
            "reward": scores.mean(), "reward_std": scores.std(ddof=1) if scores.shape[0] > 1 else jnp.zeros(()),
            "kl": (experience["kls"] * mask).sum(axis=1).mean(),
            "policy_loss": stats["loss/policy"].mean(), "value_loss": stats["loss/value"].mean(),
            "entropy": stats["policy/entropy"].mean(), "clipfrac": stats["policy/clipfrac"].mean(),
            "approxkl": stats["policy/approxkl"].mean(), "reply_length": mask.sum(axis=1).mean(),
        }
        finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(trainable)]))
        return trainable, opt_state, metrics, finite

    def minibatch_order(self, step: int) -> np.ndarray:
        """[ppo_epochs * n_minibatches, mini_batch_size] rows: a fresh permutation per epoch, from (seed, step)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step, 1])
        n = cfg.batch_size // cfg.mini_batch_size
        return np.concatenate([rng.permutation(cfg.batch_size).reshape(n, cfg.mini_batch_size)
                               for _ in range(cfg.ppo_epochs)]).astype(np.int32)

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: Array) -> Array:
        """Sampled replies: sequences [B, P+N] int32."""
        cfg = self.config
        return self.models.policy.generate(
            prompt_ids, prompt_mask, params=self.params, max_new_tokens=cfg.max_new_tokens, do_sample=True,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, prng_key=key,
            eos_token_id=list(self.models.eos_ids), pad_token_id=self.models.pad_id).sequences

    def generated(self, prompt_rows: np.ndarray, sequences: Array, needs_text: bool) -> Generated:
        """The step's replies as the reward sources read them."""
        p = self.prompts.ids.shape[1]
        sequences = np.asarray(sequences)
        reply = np.asarray(reply_mask(jnp.asarray(sequences[:, p:]), self.models.eos_ids))
        out = Generated(sequences, np.concatenate([self.prompts.mask[prompt_rows], reply], axis=1),
                        pad_id=self.models.pad_id)
        if needs_text:
            out.prompts = [self.prompts.texts[r] for r in prompt_rows]
            out.completions = [self.models.codec.decode(row[m > 0].tolist())
                               for row, m in zip(sequences[:, p:], reply, strict=True)]
        return out

    def step(self) -> dict[str, float]:
        """One PPO step (generate, score, rollout, updates, KL control); returns its float metrics.

        Raises DivergedError when the step's losses or updated params are NaN or inf; the trainer and
        the policy then hold those diverged params."""
        cfg, s = self.config, self.step_index
        rows = self.prompts.rows(cfg.seed, s, cfg.batch_size)
        prompt_ids, prompt_mask = self.prompts.ids[rows], self.prompts.mask[rows]
        sequences = self.generate(prompt_ids, prompt_mask, jax.random.fold_in(self.key, s))
        reward = self.models.reward
        source = getattr(reward, "description", f"reward {getattr(reward, '__qualname__', type(reward).__name__)}")
        scores = checked_scores(reward(self.generated(rows, sequences, getattr(reward, "needs_text", True))),
                                cfg.batch_size, source)
        trained_scores, moments = normalize_scores(scores, self.score_moments, cfg.ppo)
        kl_coef = self.kl_coef
        trainable, opt_state, metrics, finite = self.learn(
            self.trainable, self.frozen, self.opt_state, self.models.reference.params, sequences,
            jnp.asarray(prompt_mask), jnp.asarray(scores, jnp.float32), jnp.asarray(trained_scores),
            jnp.float32(kl_coef), self.minibatch_order(s))
        self.set_state(trainable, opt_state)
        self.score_moments = moments
        out = {name: float(v) for name, v in jax.device_get(metrics).items()}
        if cfg.ppo.use_score_scaling or cfg.ppo.score_clip is not None:
            out["trained_reward"] = float(trained_scores.mean())  # the mean score after scaling and clipping
        found = [f"{name} {value}" for name, value in out.items() if not math.isfinite(value)]
        found += [] if bool(finite) else ["the updated params hold NaN or inf"]
        if found:
            clip = "" if cfg.max_grad_norm is not None else " or clip gradients (max_grad_norm)"
            raise DivergedError(f"PPO step {s + 1} diverged ({', '.join(found)}); start again with a lower "
                                f"learning rate ({cfg.learning_rate}){clip} (a saved state resumes only with the "
                                "settings it was trained with)")
        if cfg.ppo.adap_kl_ctrl:  # TRL's AdaptiveKLController.update(mean_kl, batch_size)
            self.kl_coef = adaptive_kl_coef(self.kl_coef, out["kl"], cfg.batch_size, cfg.ppo.target, cfg.ppo.horizon)
        self.step_index += 1
        return {"step": s + 1, **out, "kl_coef": kl_coef}

    # --- crash-safe state -------------------------------------------------------------------
    def save_state(self, checkpointer: StateCheckpointer) -> None:
        """Orbax state of the steps done so far: trainable params, optimizer state, RNG, KL coef, data position,
        running score moments."""
        checkpointer.save(self.step_index, self.trainable, self.opt_state, rng=self.key,
                          extra={"kl_coef": self.kl_coef, "data_position": self.step_index * self.config.batch_size,
                                 "seed": self.config.seed, "run": self.run_settings, "random": random_settings(),
                                 "score_moments": dataclasses.asdict(self.score_moments)})

    def restore_state(self, checkpointer: StateCheckpointer) -> int | None:
        """Continue from the latest saved step (returns it), or None when nothing is saved."""
        step = checkpointer.latest_step()
        if step is None:
            return None
        if step > self.config.steps:
            raise TrlaxError(f"the saved state in {checkpointer.directory} is at step {step}, past --steps "
                             f"{self.config.steps}; resume with --steps {step} or more, or train into another "
                             "--output-dir")
        self.check_settings(checkpointer.extra(step), step, checkpointer.directory)  # before the arrays
        state = checkpointer.restore(step, target={"params": self.trainable, "opt_state": self.opt_state})
        self.set_state(committed(state.params, self.mesh), committed(state.opt_state, self.mesh))
        self.key = committed(state.rng, self.mesh)
        self.step_index, self.kl_coef = state.step, float(state.extra["kl_coef"])
        # States saved before trlax had score scaling were trained without it: the start moments are right.
        self.score_moments = ScoreMoments(**state.extra.get("score_moments", {}))
        return state.step


    def check_settings(self, extra: dict[str, Any], step: int, where: Path) -> None:
        """TrlaxError when the state saved at `step` (its `extra`) was trained with other settings than this run:
        a resumed run would silently change course (another batch size reads other prompts; other shared layers
        drop trained weights)."""
        again = "resume with the same flags, or train into another --output-dir"
        if extra.get("seed") != self.config.seed:
            raise TrlaxError(f"the saved state in {where} was trained with --seed {extra.get('seed')}, not "
                             f"{self.config.seed}; {again}")
        if step and extra.get("data_position") != step * self.config.batch_size:
            # The prompts of step s are rows [s * batch_size, (s + 1) * batch_size) of the seed's stream.
            raise TrlaxError(f"the saved state in {where} was trained with --batch-size "
                             f"{extra.get('data_position', 0) // step}, not {self.config.batch_size}; {again}")
        saved_random = extra.get("random")  # absent in states saved before trlax recorded them
        if saved_random is not None and saved_random != random_settings():
            raise TrlaxError(f"the saved state in {where} was trained with JAX's random settings {saved_random}, and "
                             f"this process has {random_settings()}: the resumed run would draw other random numbers "
                             "(an embedded model's init, the samples); set JAX_DEFAULT_PRNG_IMPL / "
                             "JAX_THREEFRY_PARTITIONABLE as they were, or train into another --output-dir")
        saved = extra.get("run")  # absent in states saved before trlax recorded the settings
        if saved is not None:  # settings trlax added later are at their defaults there: they trained so
            saved = with_defaults(saved, run_settings(TrainerConfig()))
        if saved is not None and saved != self.run_settings:
            before, after = dotted(saved), dotted(self.run_settings)
            changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
            shown = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
            raise TrlaxError(f"the saved state in {where} was trained with other settings ({shown}); {again}")


def check_no_later_state(checkpointer: StateCheckpointer, step: int) -> None:
    """TrlaxError when the state folder holds a step after `step`: another run's, which this one's saves would
    not replace (Orbax skips a step below the latest), and which a later resume would continue."""
    latest = checkpointer.latest_step()
    if latest is not None and latest > step:
        raise TrlaxError(f"{checkpointer.directory} holds the training state of an earlier run (step {latest}); "
                         "continue it with --resume, or train into another --output-dir")


def refuse_saved_state(output_dir: Path) -> None:
    """Before a fresh run: TrlaxError when `<output_dir>/state` already holds a saved step."""
    if not (output_dir / STATE_DIR).is_dir():
        return
    checkpointer = StateCheckpointer(output_dir / STATE_DIR, max_to_keep=2)
    try:
        check_no_later_state(checkpointer, 0)
    finally:
        checkpointer.close()


def resume(trainer: PPOTrainer, output_dir: Path) -> int:
    """Restore the latest training state in `<output_dir>/state`; returns its step (0 when there is none)."""
    if not (output_dir / STATE_DIR).is_dir():
        return 0
    checkpointer = StateCheckpointer(output_dir / STATE_DIR, max_to_keep=2)
    try:
        return trainer.restore_state(checkpointer) or 0
    finally:
        checkpointer.close()


def train(trainer: PPOTrainer, output_dir: Path,
          on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run from `trainer.step_index` to `config.steps`, saving state every `save_every` steps (and after the
    last); returns the metrics of the steps run. The policy's params are the trained ones afterwards."""
    cfg = trainer.config
    checkpointer = StateCheckpointer(output_dir / STATE_DIR, max_to_keep=2) if cfg.save_every else None
    history = []
    try:
        if checkpointer is not None:
            check_no_later_state(checkpointer, trainer.step_index)
        while trainer.step_index < cfg.steps:
            start = time.perf_counter()
            metrics = {**trainer.step(), "seconds": time.perf_counter() - start}
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
            if checkpointer is not None and (trainer.step_index % cfg.save_every == 0
                                             or trainer.step_index == cfg.steps):
                trainer.save_state(checkpointer)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return history
