"""`trlax demo`: a short, real PPO run, offline, on an embedded tiny model (or any supported checkpoint).

One PPO step, as TRL's classic PPOTrainer does it (the math is `trlax.ppo`):
  1. sample prompts; the policy generates replies (`generate`, jitted, KV cache);
  2. score each reply with the task's rule (`trlax.cli.demo_task`), a scalar per sequence;
  3. `rollout`: policy and reference forwards, per-token KL to the reference, the score
     added at the last reply token, GAE advantages and returns;
  4. `ppo_epochs` passes over shuffled minibatches of clipped policy + value loss, each an
     optax step on the trainable half of the params (the layers shared with the reference
     are frozen and never donated).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from trlax.cli.demo_report import print_samples, print_summary, write_metrics, write_outputs
from trlax.cli.demo_task import (
    Task,
    char_task,
    checkpoint_task,
    load_tokenizer,
    reply_mask,
    score_replies,
    tiny_gpt2_config,
)
from trlax.cli.preflight import check_batch_fits, check_output_dir
from trlax.errors import TrlaxError, UnsupportedModelError
from trlax.models.auto import FlaxAutoModelForCausalLM
from trlax.ppo import PPOConfig, make_ppo_update, make_rollout
from trlax.ppo_trainer import check_seed
from trlax.reference import count_layers, create_reference_model, parameter_names
from trlax.sharding import committed
from trlax.trainable import merge_trainable, split_trainable
from trlax.value_head import FlaxAutoModelForCausalLMWithValueHead, PreTrainedModelWrapper

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (TRL's PPO loss settings otherwise, see `trlax.ppo.PPOConfig`)."""

    steps: int = 120
    batch_size: int = 32  # replies generated per PPO step
    num_minibatches: int = 2
    ppo_epochs: int = 4
    learning_rate: float = 1e-2
    kl_coef: float = 0.02  # fixed per-token KL penalty (TRL's init_kl_coef, adaptive control off)
    max_new_tokens: int = 12
    seed: int = 0

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(init_kl_coef=self.kl_coef, adap_kl_ctrl=False)


@dataclasses.dataclass
class DemoModels:
    """The policy (with value head), its reference, the task, and a line describing them."""

    policy: PreTrainedModelWrapper
    reference: PreTrainedModelWrapper
    task: Task
    description: str
    shared_layers: int


# --- models ---------------------------------------------------------------------------
def build_default(seed: int = 0, max_new_tokens: int = 12, num_shared_layers: int = 1) -> DemoModels:
    """The embedded default: a random tiny GPT-2 over characters, its reference sharing the first layers."""
    config = tiny_gpt2_config()
    lm = FlaxAutoModelForCausalLM.from_config(config, seed=seed)
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, seed=seed, summary_dropout_prob=0.0)
    policy.params = committed(policy.params)
    reference = create_reference_model(policy, num_shared_layers=num_shared_layers)
    description = (f"embedded tiny GPT-2 ({config.n_layer} layers x {config.n_embd}, character vocabulary of "
                   f"{config.vocab_size}, {lm.num_params():,} params, random init) with a value head")
    return DemoModels(policy, reference, char_task(max_new_tokens), description, num_shared_layers)


def build_from_checkpoint(source: str, seed: int = 0, max_new_tokens: int = 12) -> DemoModels:
    """A checkpoint (folder or hub id) with a value head; the reference shares its first half of the layers."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(source, seed=seed)
    if policy.is_peft_model:
        raise UnsupportedModelError(f"{source} is a LoRA adapter; the demo trains a full model: pass its base model")
    policy.params = committed(policy.params)
    names = parameter_names(policy.pretrained_model)
    shared = count_layers(names, policy.pretrained_model.spec.layer_pattern) // 2
    reference = create_reference_model(policy, num_shared_layers=shared)
    vocab = int(policy.config.get_text_config().vocab_size)
    task = checkpoint_task(policy.config, load_tokenizer(source, vocab), max_new_tokens)
    lm = policy.pretrained_model
    description = f"{source} ({lm.config.model_type}, {lm.num_params():,} params) with a value head"
    return DemoModels(policy, reference, task, description, shared)


def build_models(model: str | None, seed: int, max_new_tokens: int) -> DemoModels:
    return build_default(seed, max_new_tokens) if model is None else build_from_checkpoint(model, seed, max_new_tokens)


# --- the PPO loop ---------------------------------------------------------------------
def make_experience_inputs(task: Task) -> Callable[[Array, Array, Array], tuple[dict[str, Array], Array]]:
    """A jitted (prompt_ids [B, P], prompt_mask [B, P], sequences [B, P+N]) -> (batch, scores [B]).

    batch holds what `trlax.ppo.make_rollout` reads: input_ids, attention_mask,
    position_ids (as generation used them), response_mask (reply tokens up to the eos).
    """
    target = jnp.asarray(task.target)

    def inputs(prompt_ids: Array, prompt_mask: Array, sequences: Array) -> tuple[dict[str, Array], Array]:
        reply = sequences[:, prompt_ids.shape[1]:]  # [B, N]
        mask = reply_mask(reply, task.eos_ids)
        attention = jnp.concatenate([prompt_mask, mask], axis=1)  # [B, P+N]
        positions = jnp.maximum(jnp.cumsum(attention, axis=1) - 1, 0)
        response = jnp.concatenate([jnp.zeros_like(prompt_mask), mask], axis=1)
        batch = {"input_ids": sequences, "attention_mask": attention, "position_ids": positions,
                 "response_mask": response}
        return batch, score_replies(target, reply, mask, task.max_new_tokens)

    return jax.jit(inputs)


class PPOLoop:
    """The demo's training state and step: `metrics = loop.step()` runs one PPO step.

    A step is two jitted calls: `generate`, then `learn` (scoring, rollout and every
    minibatch update, a `lax.scan` over the minibatches, so Python dispatches nothing per
    minibatch). Each epoch uses a fresh permutation of the batch, cut into
    `num_minibatches` equal minibatches (a remainder of batch_size % num_minibatches rows
    sits that epoch out).
    """

    def __init__(self, models: DemoModels, config: DemoConfig) -> None:
        self.models, self.config = models, config
        self.ppo_config = config.ppo_config()
        policy = models.policy
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate))
        self.trainable, self.frozen = split_trainable(policy.params, policy.trainable_mask)
        # Committed like the params (see `committed`): one compile of the update, not two.
        self.opt_state = committed(self.tx.init(self.trainable))
        self.rollout = make_rollout(policy, models.reference, self.ppo_config)
        self.update = make_ppo_update(policy, self.tx, self.ppo_config)
        self.inputs = make_experience_inputs(models.task)
        self.learn = jax.jit(self._learn, donate_argnums=(0, 2))
        self.key = jax.random.key(config.seed)
        self.rng = np.random.default_rng(config.seed)

    @property
    def params(self) -> dict[str, Any]:
        return merge_trainable(self.trainable, self.frozen)

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: Array,
                 params: dict[str, Any] | None = None) -> Array:
        """Sampled replies: sequences [B, P+N] int32 (prompt, then reply; pad after an eos)."""
        task = self.models.task
        return self.models.policy.generate(
            prompt_ids, prompt_mask, params=self.params if params is None else params,
            max_new_tokens=task.max_new_tokens, do_sample=True, prng_key=key, eos_token_id=task.eos_ids,
            pad_token_id=task.pad_id).sequences

    def _learn(self, trainable: Any, frozen: Any, opt_state: Any, ref_params: Any, prompt_ids: Array,
               prompt_mask: Array, sequences: Array, order: Array) -> tuple[Any, Any, dict[str, Array]]:
        """Score, rollout, then one update per row of order [ppo_epochs * num_minibatches, mb] (row indices)."""
        batch, scores = self.inputs(prompt_ids, prompt_mask, sequences)
        experience = self.rollout(merge_trainable(trainable, frozen), ref_params, batch, scores,
                                  jnp.float32(self.ppo_config.init_kl_coef))

        def minibatch_update(carry: tuple[Any, Any], rows: Array) -> tuple[tuple[Any, Any], dict[str, Array]]:
            minibatch = jax.tree_util.tree_map(lambda x: x[rows], experience)
            trainable, opt_state, stats = self.update(*carry[:1], frozen, carry[1], minibatch)
            return (trainable, opt_state), stats

        (trainable, opt_state), stats = jax.lax.scan(minibatch_update, (trainable, opt_state), order)
        mask = experience["mask"]
        metrics = {
            "reward": scores.mean(), "kl": (experience["kls"] * mask).sum(axis=1).mean(),
            "value_loss": stats["loss/value"].mean(), "policy_loss": stats["loss/policy"].mean(),
            "entropy": stats["policy/entropy"].mean(), "clipfrac": stats["policy/clipfrac"].mean(),
            "reply_length": mask.sum(axis=1).mean(),
        }
        return trainable, opt_state, metrics

    def minibatch_order(self) -> np.ndarray:
        """[ppo_epochs * num_minibatches, mb] int32 row indices: a fresh permutation per epoch."""
        cfg = self.config
        size = cfg.batch_size // cfg.num_minibatches
        rows = [self.rng.permutation(cfg.batch_size)[: size * cfg.num_minibatches].reshape(cfg.num_minibatches, size)
                for _ in range(cfg.ppo_epochs)]
        return np.concatenate(rows).astype(np.int32)

    def step(self) -> dict[str, float]:
        """One PPO step: generate, score, rollout, ppo_epochs x minibatch updates. Returns float metrics."""
        self.key, gen_key = jax.random.split(self.key)
        prompt_ids, prompt_mask = self.models.task.sample_prompts(self.rng, self.config.batch_size)
        sequences = self.generate(prompt_ids, prompt_mask, gen_key)
        self.trainable, self.opt_state, metrics = self.learn(
            self.trainable, self.frozen, self.opt_state, self.models.reference.params, prompt_ids, prompt_mask,
            sequences, self.minibatch_order())
        self.models.policy.params = self.params  # the step donated the arrays the policy held
        return {name: float(value) for name, value in jax.device_get(metrics).items()}

    def samples(self, n: int = 4) -> list[dict[str, Any]]:
        """n sampled replies from fixed prompts and a fixed key (the same before and after training).

        A full batch is generated (the shapes training compiled for) and its first n rows shown.
        """
        task = self.models.task
        seed = self.config.seed + 1234  # apart from the training stream
        prompt_ids, prompt_mask = task.sample_prompts(np.random.default_rng(seed), self.config.batch_size)
        sequences = self.generate(prompt_ids, prompt_mask, jax.random.key(seed))
        batch, scores = self.inputs(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), sequences)
        out = []
        for row in range(n):
            prompt = [int(i) for i, m in zip(prompt_ids[row], prompt_mask[row], strict=True) if m]
            reply_ids = np.asarray(sequences[row, prompt_ids.shape[1]:])
            reply = reply_ids[np.asarray(batch["response_mask"][row, prompt_ids.shape[1]:]) > 0]
            out.append({"prompt": task.decode(prompt), "reply": task.decode(reply.tolist()),
                        "reward": float(scores[row])})
        return out


def run(models: DemoModels, config: DemoConfig, progress: bool = True,
        show_before: Callable[[list[dict[str, Any]]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train for `config.steps` PPO steps; returns the log (per-step metrics, samples, timings).

    show_before: called with the samples before training, before the first step.
    on_step: called after each step with the log so far (history, samples_before).
    """
    loop = PPOLoop(models, config)
    start = time.perf_counter()
    before = loop.samples()
    if show_before is not None:
        show_before(before)
    history = []
    bar = tqdm(range(config.steps), desc="PPO", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        metrics = {"step": step, **loop.step()}
        history.append(metrics)
        if on_step is not None:
            on_step({"history": history, "samples_before": before})
        recent = history[-10:]
        bar.set_postfix(reward=f"{np.mean([m['reward'] for m in recent]):.3f}",
                        kl=f"{np.mean([m['kl'] for m in recent]):.2f}", refresh=False)
    bar.close()
    return {"history": history, "samples_before": before, "samples_after": loop.samples(),
            "train_seconds": time.perf_counter() - start}


# --- command line ---------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo", help="a short PPO run on an embedded tiny model (offline, about a minute on CPU)",
        description="Run a real PPO loop, offline: a policy with TRL's value head, a reference model sharing "
                    "its first layers, jitted generation, per-token KL to the reference, GAE, clipped policy and "
                    "value losses, optax updates. The reward is a rule you can read: the fraction of the reply "
                    "that is vowels. With no flags it trains an embedded tiny character-level GPT-2 from random "
                    "init; it prints samples before and after, a summary, and writes metrics.json and a plot "
                    "(ppo_demo.png, needs matplotlib: pip install 'trlax[plot]').")
    parser.add_argument("--model", metavar="PATH_OR_HUB_ID", default=None,
                        help="train this causal-LM checkpoint instead of the embedded default; the reward is the "
                             "same vowel rule over its tokens (tokens whose text is only vowels; ids divisible by 5 "
                             "when no tokenizer loads offline)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help=f"PPO steps (default {defaults.steps})")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help=f"replies generated per PPO step, >= 4 (default {defaults.batch_size}); each step "
                             f"makes {defaults.ppo_epochs} passes over {defaults.num_minibatches} minibatches")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default 0)")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where metrics.json and ppo_demo.png go (default: a new folder "
                             "trlax-demo-YYYYMMDD-HHMMSS under the current directory)")
    parser.set_defaults(func=run_demo_command)


def new_output_dir(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / f"trlax-demo-{stamp}", 1
    while path.exists():
        n += 1
        path = base / f"trlax-demo-{stamp}-{n}"
    return path


def run_demo_command(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    if args.batch_size < 4:
        raise TrlaxError(f"--batch-size must be at least 4 (PPO whitens advantages over each of the "
                         f"{DemoConfig.num_minibatches} minibatches); got {args.batch_size}")
    output_dir = check_output_dir(Path(args.output_dir) if args.output_dir else new_output_dir(Path.cwd()))
    config = DemoConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    models = build_models(args.model, config.seed, config.max_new_tokens)
    prompt_length = models.task.sample_prompts(np.random.default_rng(0), 1)[0].shape[1]
    check_batch_fits(models.policy.config, config.batch_size, prompt_length + config.max_new_tokens)
    print(f"policy:    {models.description}")
    n = models.shared_layers
    layers = "" if n == 0 else " and the first layer" if n == 1 else f" and the first {n} layers"
    print(f"reference: a frozen copy sharing the embeddings{layers} with the policy (create_reference_model)")
    print(f"reward:    {models.task.description}, scored at the last reply token")
    print(f"PPO:       {config.steps} steps x {config.batch_size} replies, {config.ppo_epochs} epochs x "
          f"{config.num_minibatches} minibatches, KL coefficient {config.kl_coef}, Adam lr {config.learning_rate}")
    legend = models.task.legend
    log = run(models, config, show_before=lambda samples: print_samples("before training", samples, legend),
              on_step=lambda so_far: write_metrics(output_dir, so_far, None, config, models))
    print_samples("after training", log["samples_after"], legend)
    log["wall_seconds"] = time.perf_counter() - start
    summary = print_summary(log["history"], log["wall_seconds"])
    written = write_outputs(output_dir, log, summary, config, models)
    print(f"wrote {', '.join(p.name for p in written)} to {output_dir}")
    return 0
