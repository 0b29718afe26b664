"""The trlax side of every case: set up, and hand back what to time (see common.Bench).

Every call is synced with `jax.block_until_ready`. Compilations are counted with a
`jax.monitoring` listener (backend compiles, jaxpr traces and lowerings, and their
seconds), so the result says how long the first call spent compiling and whether any
later call of the same shapes compiled again (it must not).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    Bench,
    CompileCounter,
    Context,
    output_sample,
    peak_rss_mb,
    ppo_inputs,
    rss_mb,
    token_ids,
    tokens_digest,
)

import trlax
from trlax import ppo
from trlax.trainable import tree_bytes, unique_buffer_bytes

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
ADAMW = {"learning_rate": 1e-5, "weight_decay": 1e-4}  # the torch peer uses the same


def preimport(case: Any) -> None:
    """Nothing beyond the module's imports."""


def install_counter(counter: CompileCounter) -> None:
    """Count jax compilations and traces into `counter` from now on."""

    def listener(event: str, duration: float, **_: Any) -> None:
        if event == _COMPILE:
            counter.compiles += 1
            counter.compile_s += duration
        elif event == _TRACE:
            counter.traces += 1
            counter.trace_s += duration
        elif event == _LOWER:
            counter.compile_s += duration

    jax.monitoring.register_event_duration_secs_listener(listener)


def init_device(device: str) -> str:
    """Start the backend (counted in the import time) and name the device."""
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind}"


def device_peak_mb() -> float | None:
    """Peak bytes the device allocator held (GPU); None on CPU, where peak RSS says it."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**20 if peak else None


def _dtype(ctx: Context) -> Any:
    return jnp.bfloat16 if ctx.case.dtype == "bfloat16" else jnp.float32


def _load(ctx: Context, **kwargs: Any) -> trlax.FlaxAutoModelForCausalLMWithValueHead:
    model = trlax.FlaxAutoModelForCausalLMWithValueHead.from_pretrained(ctx.model_dir, dtype=_dtype(ctx), strict=True,
                                                                       **kwargs)
    jax.block_until_ready(model.params)
    return model


def _batch(ctx: Context, seq: int) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(token_ids(ctx.cfg["vocab_size"], ctx.shapes.batch, seq))
    return ids, jnp.ones_like(ids)


# --- (a), (b), (f), (g): forward ---------------------------------------------------------------


def forward(ctx: Context) -> Bench:
    """Policy forward + value head, [B, T] tokens per call: `model(ids, attention_mask=mask)`."""
    model = _load(ctx)
    ids, mask = _batch(ctx, ctx.shapes.seq)
    return Bench(call=lambda: model(ids, attention_mask=mask), sync=jax.block_until_ready,
                 work=ids.size, check=lambda out: {"output_sample": output_sample(out[0], out[2])},
                 extra={"call": "model(ids, attention_mask=mask) -> (logits, None, values)"})


def reference(ctx: Context) -> Bench:
    """The forward of `create_reference_model(policy)` (a frozen, stop-gradient copy)."""
    policy = _load(ctx)
    ref = trlax.create_reference_model(policy)
    ids, mask = _batch(ctx, ctx.shapes.seq)
    held = unique_buffer_bytes(policy.params, ref.params) / 2**20
    return Bench(call=lambda: ref(ids, attention_mask=mask), sync=jax.block_until_ready, work=ids.size,
                 check=lambda out: {"output_sample": output_sample(out[0], out[2])},
                 extra={"call": "create_reference_model(policy)(ids, attention_mask=mask)",
                        "policy_plus_ref_param_mb": round(held, 1)})


# --- (c), (f), (g): generate -------------------------------------------------------------------


def generate(ctx: Context) -> Bench:
    """`model.generate`, left-padded-free prompts [B, prompt], eos disabled: exactly `new` tokens per row."""
    model = _load(ctx)
    s = ctx.shapes
    ids, mask = _batch(ctx, s.prompt)
    key = jax.random.key(0)
    kwargs = {"max_new_tokens": s.new_tokens, "do_sample": ctx.case.sample, "top_k": 0, "top_p": 0.9,
              "temperature": 1.0, "prng_key": key if ctx.case.sample else None,
              "pad_token_id": ctx.cfg["vocab_size"] - 1, "eos_token_id": []}  # [] = no eos: rows never finish
    if ctx.case.rollout_dtype:
        kwargs["rollout_dtype"] = jnp.dtype(ctx.case.rollout_dtype)

    def call() -> jax.Array:
        return model.generate(ids, attention_mask=mask, **kwargs).sequences

    def check(out: jax.Array) -> dict[str, Any]:
        new = out.shape[1] - s.prompt
        if new != s.new_tokens:
            raise RuntimeError(f"generate made {new} new tokens per row, expected {s.new_tokens}")
        # One compiled function per generation setting and shape: 1 here (reported, not asserted).
        return {"new_tokens_per_row": int(new), "new_tokens_digest": tokens_digest(out[:, s.prompt:]),
                "generate_fn_cache_entries": model.pretrained_model.generation_cache.compilations}

    return Bench(call=call, sync=jax.block_until_ready, work=s.batch * s.new_tokens, check=check,
                 extra={"call": f"model.generate(ids, attention_mask, max_new_tokens={s.new_tokens}, "
                                f"do_sample={ctx.case.sample}, top_k=0, top_p=0.9, eos_token_id=[], "
                                f"rollout_dtype={ctx.case.rollout_dtype})",
                        "steps_per_call": s.new_tokens})


# --- (d), (g): PPO update ----------------------------------------------------------------------


def train(ctx: Context) -> Bench:
    """One `trlax.ppo.make_ppo_update` step (optax.adamw) on a [B, T] minibatch of rollout experience.

    The experience comes from `make_rollout(policy, policy)` (the policy as its own
    reference, so no second copy is held); only the update is timed.
    """
    policy = _load(ctx)
    if ctx.case.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    raw = ppo_inputs(ctx.cfg["vocab_size"], ctx.shapes.batch, ctx.shapes.seq)
    batch = {k: jnp.asarray(raw[k]) for k in ("input_ids", "attention_mask", "response_mask")}
    config = ppo.PPOConfig()
    start = time.perf_counter()
    experience = jax.block_until_ready(ppo.make_rollout(policy, policy, config)(
        policy.params, policy.params, batch, jnp.asarray(raw["scores"]), jnp.float32(config.init_kl_coef)))
    rollout_s = time.perf_counter() - start
    tx = optax.adamw(**ADAMW)
    update = ppo.make_ppo_update(policy, tx, config)
    trainable, frozen = trlax.split_trainable(policy.params, policy.trainable_mask)
    state = {"trainable": trainable, "opt_state": tx.init(trainable)}

    def call() -> Any:
        state["trainable"], state["opt_state"], stats = update(state["trainable"], frozen, state["opt_state"],
                                                                experience)
        return stats["loss/total"], state["trainable"]

    return Bench(call=call, sync=jax.block_until_ready, work=1.0,
                 check=lambda out: {"last_step_loss": float(out[0])},
                 extra={"call": "ppo.make_ppo_update(policy, optax.adamw(1e-5, weight_decay=1e-4))",
                        "rollout_first_call_s": round(rollout_s, 3)})


# --- (e): load ---------------------------------------------------------------------------------


def load(ctx: Context) -> Bench:
    """`from_pretrained` of the value-head checkpoint, then every weight read once (one per process)."""
    extra: dict[str, Any] = {"call": "FlaxAutoModelForCausalLMWithValueHead.from_pretrained(dir)"}

    def call() -> Any:
        start = time.perf_counter()
        model = trlax.FlaxAutoModelForCausalLMWithValueHead.from_pretrained(ctx.model_dir, strict=True)
        jax.block_until_ready(model.params)
        extra["from_pretrained_s"] = time.perf_counter() - start
        if ctx.device == "cpu":  # a CPU array may alias the file's pages: read each once, as torch's side does
            for leaf in jax.tree_util.tree_leaves(model.params):
                np.asarray(leaf).sum()
        extra["param_mb"] = tree_bytes(model.params) / 2**20
        return model

    return Bench(call=call, extra=extra)


# --- (h): memory -------------------------------------------------------------------------------


def memory(ctx: Context) -> Bench:
    """Bytes of the distinct parameter buffers held by a policy and its reference."""
    variant = ctx.case.shared_layers
    if variant == "lora":
        from cases import LORA_RANK

        policy = _load(ctx, peft_config=trlax.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                          target_modules=["c_attn"]))
        ref = trlax.create_reference_model(policy)  # a LoRA policy's reference: the base with the adapter off
        how = f"from_pretrained(peft_config=LoraConfig(r={LORA_RANK}, c_attn)) + create_reference_model(policy)"
    else:
        policy = _load(ctx)
        shared = None if variant == "none" else ctx.cfg["n_layer"] // 2
        ref = trlax.create_reference_model(policy, num_shared_layers=shared)
        how = f"create_reference_model(policy, num_shared_layers={shared})"
    jax.block_until_ready((policy.params, ref.params))
    held = unique_buffer_bytes(policy.params, ref.params) / 2**20
    alone = unique_buffer_bytes(policy.params) / 2**20
    return Bench(static={"value": held}, extra={
        "call": how, "policy_param_mb": round(alone, 1), "policy_plus_ref_param_mb": round(held, 1),
        "ref_extra_mb": round(held - alone, 1), "rss_above_import_mb": round(rss_mb() - ctx.rss_baseline_mb, 1),
        "peak_rss_above_import_mb": round(peak_rss_mb() - ctx.rss_baseline_mb, 1)})


CASES = {"forward": forward, "reference": reference, "generate": generate, "train": train, "load": load,
         "memory": memory}
