"""PPO with trlax on a device mesh: the same script on a laptop, a multi-GPU host or a TPU pod.

    # CPU, 8 simulated devices, a tiny random GPT-2 (no download, ~1 minute):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/multihost_ppo.py --fsdp 4 --tp 2

    # one multi-GPU host (one process sees every GPU):
    python examples/multihost_ppo.py --model gpt2 --fsdp -1

    # a TPU pod slice or several GPU hosts: run the same command on every host
    python examples/multihost_ppo.py --model Qwen/Qwen2.5-0.5B --distributed --fsdp -1 --tp 4 \\
        --checkpoint-dir gs://bucket/run1 --output-dir /shared/ppo-model

    # two processes on one machine, 4 simulated CPU devices each, as two hosts would run it:
    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multihost_ppo.py --distributed \\
          --coordinator localhost:12355 --num-processes 2 --process-id $i --fsdp 4 --tp 2 --output-dir /tmp/ppo-model &
    done; wait

The task is a toy (the reward is how often the policy emits one chosen token), so the
script needs no dataset or reward model; swap in your prompts and reward function.
Every host runs the same code on the same global arrays (prompts are generated from the
same seed everywhere); each device holds only its shards of the params, the optimizer
state, the KV cache and the batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import transformers

from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead
from trlax.checkpoint import StateCheckpointer, restore_state, save_state, wait_until_finished
from trlax.ppo import PPOConfig, make_ppo_update, make_rollout
from trlax.reference import create_reference_model
from trlax.sharding import describe, make_mesh, shard_batch
from trlax.trainable import merge_trainable, split_trainable


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local folder (default: a tiny random GPT-2)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    parser.add_argument("--coordinator", default=None,
                        help="with --distributed: HOST:PORT of process 0 (default: found from the environment)")
    parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: how many processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's rank")
    parser.add_argument("--data", type=int, default=1, help="data-parallel mesh size")
    parser.add_argument("--fsdp", type=int, default=-1, help="FSDP mesh size (-1: the remaining devices)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel mesh size")
    parser.add_argument("--steps", type=int, default=4, help="steps to run (after a resume: this many more)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (a multiple of data x fsdp)")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--target-token", type=int, default=7, help="the toy reward counts this token")
    parser.add_argument("--checkpoint-dir", default=None, help="Orbax training-state folder (resumes from it)")
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--output-dir", default=None, help="write the trained policy here as a TRL checkpoint")
    return parser.parse_args()


def tiny_gpt2(folder: str) -> str:
    """A small random GPT-2 saved as a transformers checkpoint, so loading goes the usual way."""
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is past 128 tokens
    FlaxAutoModelForCausalLM.from_config(config, seed=0).save_pretrained(folder)
    return folder


def main() -> None:
    args = parse_args()
    if args.distributed:
        # Without arguments, finds the coordinator from the environment (TPU pods, SLURM,
        # Open MPI); afterwards jax.devices() lists the devices of every host. CPU processes
        # talk through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(data=args.data, fsdp=args.fsdp, tp=args.tp)
    main_process = jax.process_index() == 0
    if main_process:
        print(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}")

    # 1. Load straight into the sharded layout: one tensor at a time, each device its slice.
    source = args.model or tiny_gpt2(tempfile.mkdtemp(prefix="trlax-tiny-gpt2-"))
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(source, mesh=mesh)
    if main_process:
        for path, layout in list(describe(policy.params).items())[:4]:
            print(f"  {path}: {layout}")
    # 2. The reference shares the embeddings and first layer with the policy (same arrays,
    #    still sharded); those leaves are frozen in the policy.
    reference = create_reference_model(policy, num_shared_layers=1)
    trainable, frozen = split_trainable(policy.params, policy.trainable_mask)
    tx = optax.adam(1e-5)
    opt_state = tx.init(trainable)  # zeros_like: the moments take their params' shardings

    config = PPOConfig()
    rollout = make_rollout(policy, reference, config)
    update = make_ppo_update(policy, tx, config)
    key, start = jax.random.key(0), 0
    if args.checkpoint_dir and StateCheckpointer(args.checkpoint_dir, read_only=True).latest_step() is not None:
        # Restores onto this run's mesh, whatever mesh (or device count) saved it.
        state = restore_state(args.checkpoint_dir, target={"params": policy.params, "opt_state": opt_state},
                              target_sharding=mesh, model_type=policy.config.model_type)
        trainable, _ = split_trainable(state.params, policy.trainable_mask)
        opt_state, key, start = state.opt_state, state.rng, state.step + 1
        if main_process:
            print(f"resumed from step {state.step}")

    @jax.jit
    def toy_reward(responses: jax.Array) -> jax.Array:
        return jnp.mean(responses == args.target_token, axis=1).astype(jnp.float32)  # [B]

    b, t, n = args.batch_size, args.prompt_len, args.new_tokens
    vocab = policy.config.vocab_size
    for step in range(start, start + args.steps):
        began = time.perf_counter()
        key, prompt_key, sample_key = jax.random.split(key, 3)
        prompts = jax.random.randint(prompt_key, (b, t), 0, vocab)  # the same global batch on every host
        params = merge_trainable(trainable, frozen)
        # 3. Generation: batch split over (data, fsdp), KV cache split over batch and kv heads.
        sequences = policy.generate(prompts, attention_mask=jnp.ones_like(prompts), params=params,
                                    max_new_tokens=n, do_sample=True, prng_key=sample_key).sequences
        batch = shard_batch({
            "input_ids": sequences,
            "attention_mask": jnp.ones_like(sequences),
            "response_mask": jnp.concatenate([jnp.zeros((b, t), jnp.int32), jnp.ones((b, n), jnp.int32)], axis=1),
        }, mesh)
        scores = toy_reward(sequences[:, t:])
        # 4. One PPO epoch on the whole batch (split `experience` along the batch for minibatches).
        experience = rollout(params, reference.params, batch, scores, jnp.float32(config.init_kl_coef))
        trainable, opt_state, stats = update(trainable, frozen, opt_state, experience)
        # Every process computes the metrics (a computation on global arrays runs on all hosts
        # or on none); one prints them.
        reward, loss = float(scores.mean()), float(stats["loss/total"])
        if main_process:
            print(f"step {step}: reward {reward:.3f}  loss {loss:.4f}  ({time.perf_counter() - began:.1f}s)")
        if args.checkpoint_dir and (step + 1) % args.save_every == 0:
            # Every host writes its own shards; async: training continues while files are written.
            save_state(args.checkpoint_dir, step, merge_trainable(trainable, frozen), opt_state, rng=key,
                       async_save=True)
    if args.checkpoint_dir:
        wait_until_finished(args.checkpoint_dir)  # the last asynchronous save is committed
    policy.params = merge_trainable(trainable, frozen)
    if args.output_dir:
        # On every process: process 0 writes while the sharded tensors are gathered one at a time.
        policy.save_pretrained(args.output_dir)
        if main_process:
            print(f"saved the policy to {args.output_dir}")


if __name__ == "__main__":
    main()
