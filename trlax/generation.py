"""Jit-compiled generation with a preallocated KV cache, for causal and encoder-decoder LMs.

Everything after the argument checks runs inside ONE jitted function per model and
`GenerationSettings` (max_new_tokens, do_sample, top_k, whether top_p is on, how many eos
ids): the prompt pass, then a `lax.while_loop` over decode steps whose carry holds the KV
cache, so XLA updates the cache in place and no Python runs per token. temperature,
top_p and the pad / eos / decoder start ids are traced, so changing them does not
recompile. Each model keeps its compiled functions in its `generation_cache`, which
counts the compilations (`model.generation_cache.compilations`).

Padding, cache slots and positions (causal):
    Prompts are LEFT-padded to a common length T, with an explicit attention_mask (here never
    inferred from pad ids: pad may equal eos or a real token; the model's `generate` infers
    one as transformers does, see `FlaxPreTrainedModel.generate`). The cache has
    S = T + max_new_tokens slots. The prompt pass writes slots 0..T-2, and loop step i
    feeds one token into slot T - 1 + i (the last prompt token at i = 0, then each new
    token), so one scalar write index serves every row.
    The key mask [B, S] is the prompt mask followed by ones: slots not yet written lie in
    the future of every query, so the causal rule ("key slot <= query slot") hides them.
    Positions follow transformers' generate: max(cumsum(mask) - 1, 0), so each row's first
    real token sits at position 0 whatever its padding, and the token in slot T - 1 + i of
    a row with n real prompt tokens sits at position n - 1 + i.

LongRoPE picks its frequencies from a call's largest position, so its prompt pass takes the whole
prompt (slots 0..T-1; step 0 writes slot T-1 again with equal values), as transformers' does; a
family whose transformers drops its cache at the pretraining length + 1 tokens (Phi-3:
`spec.rebuilds_longrope_cache`) recomputes every slot at that loop step, as there.

Encoder-decoder: the encoder runs once; the decoder starts from decoder_start_token_id in
slot 0 and loop step i feeds its token into slot i (S = max_new_tokens slots).

Finished rows (after an eos) emit pad_token_id, as transformers does, and the loop stops
early once every row is finished; the output keeps its static shape, filled with pad.

Rollout precision: the loop computes in the model's compute dtype, or in `rollout_dtype`
when one is given (e.g. bfloat16 from float32 master params). Either way the weight
matrices (every float param with 2 or more dims: projections, embeddings, the tied LM
head) are cast to it ONCE per call, before the prompt pass, so a decode step streams
weights of that dtype and converts none; vectors (norms, biases) keep their dtype. The
cast copies exist only during the call (for bfloat16 from float32: half the params'
bytes); params already in that dtype are used as they are. The KV cache is in the same
dtype, except on CPU, where it stays float32 (XLA:CPU's attention products run in float32
only); logits and sampling stay float32.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trlax.checkpoint.naming import hf_key
from trlax.errors import InputError, TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.generation_config import id_list, penalty_context, process_logits, refuse_traced_token_ids
from trlax.inputs import (
    check_positions,
    check_token_range,
    explained_device_mismatch,
    is_concrete,
    live_params,
    mask_for,
    token_ids,
)
from trlax.models.layers import LORA_COLLECTION
from trlax.models.rope import longrope_length
from trlax.sharding import constrain_kv_cache, shard_batch

if TYPE_CHECKING:
    from trlax.models.base import FlaxPreTrainedModel

Array = jax.Array


@flax.struct.dataclass
class GenerateOutput:
    """sequences: [B, T + new] int32 for causal LMs (the prompt included, like transformers);
    [B, Td + new] for encoder-decoder LMs (the decoder prompt, by default the start token alone, then the
    new tokens)."""

    sequences: Array


@dataclass(frozen=True)
class GenerationSettings:
    """What a compiled generate function is specialised on: its key in the model's GenerationCache."""

    max_new_tokens: int
    do_sample: bool
    top_k: int  # 0 = off
    use_top_p: bool  # False when top_p == 1.0: skips the sort statically
    num_eos: int  # 0 = no eos: rows never finish early
    min_new_tokens: int = 0  # eos is banned for this many steps (trlax.generation_config)
    use_repetition_penalty: bool = False  # False when repetition_penalty == 1.0
    num_forced_eos: int = 0  # forced_eos_token_id: ids the last step must choose among (0 = off)
    rollout_dtype: Any = None  # compute dtype of the loop (a numpy dtype); None = the model's
    forward_config: tuple[Any, ...] = ()  # the model's per-call config fields (FlaxPreTrainedModel.sync_forward_config)


@flax.struct.dataclass
class _Knobs:
    """The traced arguments: new values reuse the compiled function."""

    temperature: Array  # [] float32
    top_p: Array  # [] float32
    pad_id: Array  # [] int32
    eos_ids: Array  # [num_eos] int32
    start_id: Array  # [] int32: the decoder start token (encoder-decoder only)
    repetition_penalty: Array  # [] float32 (used when settings.use_repetition_penalty)
    forced_eos_ids: Array  # [num_forced_eos] int32


# A compiled generate function: (params, lora, ids, mask, knobs, key[, decoder prompt]) -> (sequences, whether every
# logit a token was chosen from was finite).
GenerateFn = Callable[..., tuple[Array, Array]]


class GenerationCache:
    """A model's compiled generate functions, one per GenerationSettings, and how often they compiled.

    `compilations` counts traces: a new settings value, or new input shapes or dtypes for an
    existing one, each compile once; a repeated call with the same ones compiles nothing.
    """

    def __init__(self) -> None:
        self._fns: dict[GenerationSettings, GenerateFn] = {}
        self._traced_with: dict[GenerationSettings, tuple[Any, ...]] = {}
        self.compilations = 0

    def get(self, settings: GenerationSettings, build: Callable[[], GenerateFn]) -> GenerateFn:
        """The jitted function for `settings`, built (not yet compiled) on first use."""
        if settings not in self._fns:
            run = build()

            def counted(*args: Any) -> tuple[Array, Array]:
                # Runs only while jax traces, i.e. once per compilation.
                self.compilations += 1
                self._traced_with[settings] = jax.tree_util.tree_map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
                return run(*args)

            self._fns[settings] = jax.jit(counted)
        return self._fns[settings]

    def compiled_text(self, settings: GenerationSettings | None = None) -> str:
        """The optimised XLA module (HLO text) of `settings`' function, for the argument shapes it
        was last compiled for; settings None = the only one compiled. For profiling and tests:
        it compiles again (without the shardings of the original call)."""
        if settings is None:
            if len(self._traced_with) != 1:
                raise TrlaxError(f"{len(self._traced_with)} generate functions compiled: name the settings")
            settings = next(iter(self._traced_with))
        return self._fns[settings].lower(*self._traced_with[settings]).compile().as_text()

    def __len__(self) -> int:
        return len(self._fns)


# --- sampling -----------------------------------------------------------------------------

# The floor of max-shifted sampling logits: exp(-1e4) is 0 in float32 (its exp underflows below -104).
SHIFTED_LOGIT_FLOOR = -1e4


def _top_p_mask(logits: Array, top_p: Array) -> Array:
    """transformers' TopPLogitsWarper keep-mask [B, V] for unsorted logits, without a sort.

    The warper removes a token when the probability mass of the tokens at most as likely
    (itself included: its ascending cumsum) is <= 1 - top_p, and always keeps the most
    likely one. That mass grows with the probability, so the removed tokens are those
    at or below one cut, found by bisection on the bits of the float32 probabilities
    (ordered like the floats, as they are >= 0): 31 masked O(V) sums instead of the
    O(V log V) sort that XLA:CPU runs slowly. Ties at the cut go together.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [B, V]

    def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds  # [B, 1] each: the cut lies in [lo, hi)
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits <= mid, probs, 0.0), axis=-1, keepdims=True)
        removable = mass <= 1.0 - top_p
        return jnp.where(removable, mid, lo), jnp.where(removable, hi, mid)

    lo = jnp.full(probs.shape[:-1] + (1,), -1, jnp.int32)  # nothing is at or below -1
    hi = jnp.max(bits, axis=-1, keepdims=True)  # the most likely token is never removed
    cut, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return bits > cut


def _argmax(x: Array) -> Array:
    """First index of the maximum along the last axis, [B] int32 (jnp.argmax's answer).

    A max-reduce followed by a min-reduce of matching indices: XLA:CPU vectorises both,
    while its fused (value, index) argmax reduce is slower (measured on [8, 50257] noisy
    logits: a Gumbel draw took 6.4 ms with jnp.argmax, 2.8 ms with this).
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # NaN rows match nothing: clamp like a valid id


def _categorical(key: Array, logits: Array) -> Array:
    """jax.random.categorical (Gumbel-max, same draws for the same key), with the fast argmax."""
    return _argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def filtered_logits(logits: Array, top_k: int, top_p: Array | None) -> Array:
    """transformers' TopK then TopP warpers on logits [B, V] float32: the removed tokens set to -inf.

    top_k (static, 0 = off) keeps every token at least as likely as the k-th, ties included (as
    `TopKLogitsWarper`: it removes only what is below the k-th value); top_p (None = off) as
    `TopPLogitsWarper` (see `_top_p_mask`). Nothing sorts the whole vocabulary.
    """
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p is not None:
        logits = jnp.where(_top_p_mask(logits, top_p), logits, -jnp.inf)
    return logits


def _next_token(logits: Array, key: Array | None, settings: GenerationSettings, knobs: _Knobs) -> Array:
    """The next token [B] int32 from last-position logits [B, V] float32.

    Greedy: argmax (first index on ties, like torch). Sampling applies transformers'
    warpers in its order (temperature, top-k, top-p), then draws from the categorical.
    """
    if not settings.do_sample:
        return _argmax(logits)
    logits = logits / knobs.temperature
    # Shifted to a row maximum of 0 and floored (float32's exp is 0 far above the floor; the warpers and the draw
    # do not change under a shift): XLA:CPU's fused softmax gave NaN for rows ~1e10 apart (temperature ~1e-9).
    logits = jnp.maximum(logits - jnp.max(logits, axis=-1, keepdims=True), SHIFTED_LOGIT_FLOOR)
    return _categorical(key, filtered_logits(logits, settings.top_k, knobs.top_p if settings.use_top_p else None))


# --- the decode loop, shared by both model kinds -------------------------------------------


def _finish(token: Array, done: Array, knobs: _Knobs) -> tuple[Array, Array]:
    """transformers' rule: a finished row emits pad; a row finishes once it emits an eos."""
    token = jnp.where(done, knobs.pad_id, token)
    return token, done | jnp.any(token[:, None] == knobs.eos_ids[None, :], axis=-1)


def _decode_loop(
    step: Callable[[Array, Array, Any], tuple[Array, Any]],
    first_fed: Array,
    cache: Any,
    key: Array | None,
    settings: GenerationSettings,
    knobs: _Knobs,
    context: Array,
    rebuild: tuple[int, Callable[[Array, Any], tuple[Array, Any]]] | None = None,
) -> tuple[Array, Array]:
    """(the new tokens [B, max_new_tokens] int32, one per `step` call; whether every logit a token was chosen from
    was finite: a bool scalar).

    step(token [B], i, cache) -> (logits [B, V], cache) feeds the token of loop index i
    (`first_fed` at i = 0, then the token chosen at i - 1) and returns the next logits.
    context: the prompt ids [B, T] the repetition penalty counts (`penalty_context`).
    rebuild: (i, fn): at loop index i, fn(new tokens so far [B, max_new_tokens], cache) -> (logits, cache)
    runs instead of `step` (Phi-3's LongRoPE cache rebuild, see `_causal_fn`).
    """
    n = settings.max_new_tokens
    b = first_fed.shape[0]

    def cond(state: tuple[Any, ...]) -> Array:
        i, _, done, _, _, _, _ = state
        if not settings.num_eos:
            return i < n
        return (i < n) & ~jnp.all(done)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        i, token, done, tokens, cache, key, finite = state
        if rebuild is None:
            logits, cache = step(token, i, cache)
        else:
            logits, cache = jax.lax.cond(i == rebuild[0], lambda c: rebuild[1](tokens, c),
                                         lambda c: step(token, i, c), cache)
        finite &= jnp.all(done[:, None] | jnp.isfinite(logits))  # rows still generating
        penalty = knobs.repetition_penalty if settings.use_repetition_penalty else None
        logits = process_logits(logits, i, context, tokens, knobs.eos_ids, min_new_tokens=settings.min_new_tokens,
                                repetition_penalty=penalty,
                                forced_eos_ids=knobs.forced_eos_ids if settings.num_forced_eos else None,
                                last_step=n - 1)
        step_key = None
        if settings.do_sample:
            key, step_key = jax.random.split(key)
        token, done = _finish(_next_token(logits, step_key, settings, knobs), done, knobs)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (jnp.int32(0), i))
        return i + 1, token, done, tokens, cache, key, finite

    tokens = jnp.full((b, n), knobs.pad_id, jnp.int32)
    state = (jnp.int32(0), first_fed, jnp.zeros((b,), bool), tokens, cache, key, jnp.bool_(True))
    _, _, _, tokens, _, _, finite = jax.lax.while_loop(cond, body, state)
    return tokens, finite


def _last_logits(lm: Any, input_ids: Array, mask: Array, positions: Array, cache: Any) -> tuple[Array, Any]:
    """A causal LM's forward over input_ids [B, L] from cache slot 0: (float32 logits [B, V] of the last position
    only, the cache). The LM head of the other L - 1 positions ([B, L, V]: GBs for a long prompt) is never
    computed. Used with `module.apply(..., method=_last_logits)`."""
    h, _, cache = getattr(lm, lm.backbone_name)(input_ids, mask, positions, deterministic=True,
                                                 output_hidden_states=False, cache=cache, cache_index=jnp.int32(0))
    return lm.logits(h[:, -1:])[:, -1].astype(jnp.float32), cache


def _variables(params: Any, lora: Any) -> dict[str, Any]:
    """The module's variables: the base params, plus a LoRA adapter when one is active."""
    return {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}


def _rollout_dtype(model: FlaxPreTrainedModel, settings: GenerationSettings) -> Any:
    return model.dtype if settings.rollout_dtype is None else settings.rollout_dtype


def _cache_dtype(dtype: Any) -> Any:
    """The KV cache's dtype for a loop computing in `dtype`: the same, except on CPU, where it stays
    float32: XLA:CPU runs the attention products (batched dots) in float32 only and would convert
    every layer's whole low-precision cache to float32 on every step."""
    if jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize < 4:
        return jnp.float32
    return dtype


def _rollout_module(model: FlaxPreTrainedModel, settings: GenerationSettings) -> Any:
    """The model's module, computing in the rollout dtype."""
    dtype = _rollout_dtype(model, settings)
    return model.module if jnp.dtype(dtype) == jnp.dtype(model.dtype) else model.module.clone(dtype=dtype)


def cast_weights(params: Any, dtype: Any, float32_keys: tuple[str, ...] = ()) -> Any:
    """params with every floating array of >= 2 dims (the weight matrices) cast to `dtype`.

    Vectors (norm scales, biases) and integer leaves are left as they are; leaves already
    of `dtype` are not copied; under a float16 `dtype`, weights whose HF keys match
    `float32_keys` (the spec's: T5's `wo`, which its module computes in float32, as transformers
    does) too. Inside jit the casts run where this is called and stay
    there: an optimization barrier keeps XLA from sinking them into a later while loop
    (its WhileLoopFusibleSinking pass would, and every step would then read the float32
    weights and convert them again).
    """
    kept = [re.compile(pattern) for pattern in float32_keys] if jnp.dtype(dtype) == jnp.float16 else []

    def needs_cast(path: tuple[Any, ...], leaf: Any) -> bool:
        if not (jnp.ndim(leaf) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype):
            return False
        return not (kept and any(k.search(hf_key(tuple(str(key.key) for key in path))) for k in kept))

    if not any(needs_cast(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]):
        return params
    cast = jax.tree_util.tree_map_with_path(lambda path, leaf: leaf.astype(dtype) if needs_cast(path, leaf) else leaf,
                                            params)
    return jax.lax.optimization_barrier(cast)


def _causal_fn(model: FlaxPreTrainedModel, settings: GenerationSettings) -> GenerateFn:
    module, spec, config = _rollout_module(model, settings), model.spec, model.module.config
    dtype = _rollout_dtype(model, settings)
    n = settings.max_new_tokens
    longrope = longrope_length(config)

    def run(params: Any, lora: Any, input_ids: Array, mask: Array, knobs: _Knobs,
            key: Array | None) -> tuple[Array, Array]:
        b, t = input_ids.shape
        variables = _variables(cast_weights(params, dtype, spec.float32_keys), lora)
        cache = constrain_kv_cache(spec.init_cache(config, b, t + n, _cache_dtype(dtype)), model.mesh,
                                   model.sharding_rules)
        kv_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)  # [B, S]
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
        if t > 1:
            # Prefill all but the last prompt token. Its logits are unused, so XLA drops the
            # LM head (the costliest matmul of a long prompt); the last prompt token is the
            # loop's first fed token, whose logits give the first new token. LongRoPE picks its
            # factors from a call's largest position, so there the prefill takes the whole prompt,
            # as transformers' does (step 0 writes the last token's slot again, with equal values).
            prefill = t if longrope is not None else t - 1
            cache = module.apply(variables, input_ids[:, :prefill], kv_mask, positions[:, :prefill], cache=cache,
                                 cache_index=0).cache

        def step(token: Array, i: Array, cache: Any) -> tuple[Array, Any]:
            # Loop index i feeds slot T - 1 + i at position positions[:, -1] + i.
            pos = (positions[:, -1] + i)[:, None]  # [B, 1]
            out = module.apply(variables, token[:, None], kv_mask, pos, cache=cache, cache_index=t - 1 + i)
            return out.logits[:, -1], constrain_kv_cache(out.cache, model.mesh, model.sharding_rules)

        def rebuild(tokens: Array, cache: Any) -> tuple[Array, Any]:
            # Every position again, the prompt and the `at` new tokens: a call past the pretraining length,
            # so LongRoPE's factors are picked anew for the whole sequence, as transformers' Phi-3 does.
            ids = jnp.concatenate([input_ids, tokens[:, :at]], axis=1)  # [B, T + at]
            pos = jnp.concatenate([positions, positions[:, -1:] + jnp.arange(1, at + 1)], axis=1)
            logits, cache = module.apply(variables, ids, kv_mask, pos, cache, method=_last_logits)
            return logits, constrain_kv_cache(cache, model.mesh, model.sharding_rules)

        # transformers' Phi-3 rebuilds its cache at the step whose input first holds the pretraining length + 1
        # tokens, if the prompt was within it: loop index `at`.
        at = longrope + 1 - t if spec.rebuilds_longrope_cache and longrope is not None else 0
        new, finite = _decode_loop(step, input_ids[:, -1], cache, key, settings, knobs,
                                   penalty_context(input_ids, mask), rebuild=(at, rebuild) if 1 <= at < n else None)
        return jnp.concatenate([input_ids, new], axis=1), finite

    return _traced_under_mesh(model, run)


def _seq2seq_fn(model: FlaxPreTrainedModel, settings: GenerationSettings) -> GenerateFn:
    module, spec, config = _rollout_module(model, settings), model.spec, model.module.config
    dtype = _rollout_dtype(model, settings)
    n = settings.max_new_tokens

    def run(params: Any, lora: Any, input_ids: Array, mask: Array, knobs: _Knobs, key: Array | None,
            decoder_prompt: Array) -> tuple[Array, Array]:
        b, td = decoder_prompt.shape
        variables = _variables(cast_weights(params, dtype, spec.float32_keys), lora)
        encoded, _ = module.apply(variables, input_ids, mask, method="encode")  # [B, Te, H]
        # Decoder slot j < Td - 1 holds prompt token j (prefilled); loop index i feeds slot
        # Td - 1 + i: the last prompt token (the start token without a prompt), then the
        # first n - 1 new tokens (the last is never fed back). An all-ones key mask works
        # because unwritten slots lie in the future of every query.
        slots = td - 1 + n
        cache = constrain_kv_cache(spec.init_cache(config, b, slots, _cache_dtype(dtype)), model.mesh,
                                   model.sharding_rules)
        dec_mask = jnp.ones((b, slots), jnp.int32)
        if td > 1:
            cache = module.apply(variables, decoder_prompt[:, :-1], dec_mask, encoded, mask, cache=cache,
                                 cache_index=0, method="decode").cache

        def step(token: Array, i: Array, cache: Any) -> tuple[Array, Any]:
            out = module.apply(variables, token[:, None], dec_mask, encoded, mask, cache=cache,
                               cache_index=td - 1 + i, method="decode")
            return out.logits[:, -1], constrain_kv_cache(out.cache, model.mesh, model.sharding_rules)

        new, finite = _decode_loop(step, decoder_prompt[:, -1], cache, key, settings, knobs, decoder_prompt)
        return jnp.concatenate([decoder_prompt, new], axis=1), finite

    return _traced_under_mesh(model, run)


def _traced_under_mesh(model: FlaxPreTrainedModel, run: GenerateFn) -> GenerateFn:
    """`run`, traced inside the model's sharding context: on a mesh, layer outputs stay
    batch-sharded and the KV cache keeps its layout (batch, kv heads); else unchanged."""

    def traced(*args: Any) -> tuple[Array, Array]:
        with model.sharding_context():
            return run(*args)

    return traced


# --- the public entry point ----------------------------------------------------------------


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def decoder_start_id(config: Any, given: int | None = None) -> int | None:
    """The decoder start token: `given` (the generation settings'), else the config's
    decoder_start_token_id, else its bos_token_id (transformers' order); None when none is set."""
    start = given
    for name in ("decoder_start_token_id", "bos_token_id"):
        start = _config_value(config, name) if start is None else start
    if start is None:
        return None
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) and np.ndim(start) != 0:
        raise UnsupportedModelError(f"decoder_start_token_id must be one token id; got {start!r} (transformers' "
                                    "one start token per row is not supported: generate each start separately)")
    return int(start)


def start_prepended(decoder_prompt: Any, start: int | None) -> bool:
    """Whether generate puts the start token in front of a decoder prompt [B, Td] (as the caller gave it: a
    list, NumPy, a jax.Array): when no row begins with it, as transformers does (a traced prompt is taken as it
    is). Read on the host before any conversion: under a trace, jnp would stage even a concrete prompt."""
    return (start is not None and is_concrete(decoder_prompt)
            and bool(np.all(np.asarray(jax.device_get(decoder_prompt))[:, 0] != start)))


def _scalar(x: Any) -> float | None:
    """A setting's value when it is a concrete scalar (Python, numpy, or a concrete 0-d array); None when
    traced (checked by nothing: the caller's responsibility)."""
    if is_concrete(x) and np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.number):
        return float(x)
    return None


def on_device(value: Any, dtype: Any) -> Array:
    """A setting as a device array of `dtype`: traced or device values as they are (cast), host values by an
    explicit transfer, which `jax.transfer_guard("disallow")` allows."""
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    return jax.device_put(np.asarray(value, dtype))


def _check_prompt_mask(mask: Array) -> None:
    """Causal prompts must be left-padded: the loop appends after the last column."""
    if is_concrete(mask) and not np.all(jax.device_get(mask)[:, -1] == 1):  # NumPy: jnp would stage it in a trace
        raise InputError(
            "generate needs left-padded prompts: every row's last attention_mask entry must be 1 "
            "(pad on the left, e.g. tokenizer.padding_side = 'left')"
        )


def _check_number(name: str, value: Any) -> None:
    """A setting applied to every row: a number, or a 0-d array (traced ones too); an array of another shape was
    broadcast against the logits and skipped the range checks."""
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype  # a tracer has one
    if np.ndim(value) != 0 or not np.issubdtype(dtype, np.number):
        raise InputError(f"{name} must be one number for every row (a Python float or a 0-d array); got {value!r}")


@functools.cache
def raw_key_shape(default_impl: str) -> tuple[int, ...]:
    """The shape of `jax.random.PRNGKey`'s raw key data under the default PRNG `default_impl` (the cache key)."""
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def _check_key(prng_key: Any) -> None:
    """One jax.random key: a typed key of shape () or raw uint32 key data of the default PRNG's shape ([2] for
    threefry, [4] for rbg: `jax.random.PRNGKey(0)` under `jax_default_prng_impl`)."""
    if prng_key is None:
        raise InputError("do_sample=True needs prng_key (a jax.random key), e.g. prng_key=jax.random.key(0)")
    dtype = getattr(prng_key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw_shape = raw_key_shape(str(jax.config.jax_default_prng_impl))
    if (np.shape(prng_key) != () if typed else (np.shape(prng_key) != raw_shape or dtype != jnp.uint32)):
        raise InputError(f"prng_key must be one jax.random key, e.g. jax.random.key(0) (one key for the whole batch: "
                         f"generate splits it per step); got {getattr(prng_key, 'shape', prng_key)!r}")


def check_sampling(temperature: Any, top_k: Any, top_p: Any, *, do_sample: bool = True) -> None:
    """InputError unless the sampling settings are valid: top_k a Python int >= 0; temperature and top_p
    one number each and, when sampling, temperature > 0 and top_p in [0, 1] (traced values: shape and dtype
    only). `generate` runs it; a trainer can run it before it loads anything."""
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"top_k must be a Python int >= 0 (0 = off; it sets a static shape); got {top_k!r}")
    _check_number("temperature", temperature)
    _check_number("top_p", top_p)
    if not do_sample:
        return
    # The logits are divided by it in float32, where XLA flushes subnormals to 0: at least float32's smallest normal.
    if (value := _scalar(temperature)) is not None and not np.float32(value) >= np.finfo(np.float32).tiny:
        raise InputError(f"temperature must be > 0 (at least 1.2e-38, float32's smallest normal number) when "
                         f"sampling (use do_sample=False for greedy); got {temperature}")
    if (value := _scalar(top_p)) is not None and not 0.0 <= value <= 1.0:
        raise InputError(f"top_p must be in [0, 1] (1.0 = off); got {top_p}")


def _check_rollout_dtype(rollout_dtype: Any, model: FlaxPreTrainedModel) -> Any:
    """The rollout dtype as a numpy dtype (hashable: part of the compiled function's key), or
    None for the model's compute dtype (given or not)."""
    if rollout_dtype is None:
        return None
    try:
        dtype = jnp.dtype(rollout_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"rollout_dtype must be a floating dtype such as jnp.bfloat16 or jnp.float32 "
                         f"(or None for the model's dtype); got {rollout_dtype!r}")
    return None if dtype == jnp.dtype(model.dtype) else dtype


def generate(
    model: FlaxPreTrainedModel,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    params: dict[str, Any] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float | Array = 1.0,
    prng_key: Array | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    decoder_start_token_id: int | None = None,
    lora: dict[str, Any] | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float | Array = 1.0,
    forced_eos_token_id: int | Sequence[int] | None = None,
    decoder_input_ids: Any = None,
    rollout_dtype: Any = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per row with a KV cache, jit-compiled.

    model: a trlax FlaxModelForCausalLM or FlaxModelForSeq2SeqLM. input_ids: [B, T] int
    (causal: left-padded prompts; seq2seq: encoder input, any padding). attention_mask:
    [B, T] (1 = token), default all ones. params: default `model.params`.
    Greedy (argmax) unless do_sample; sampling applies temperature, then top_k (a static
    int, 0 = off), then top_p (1.0 = off) as transformers does, and needs `prng_key`.
    pad_token_id / eos_token_id (an int or a list; [] = none) / decoder_start_token_id
    default to the model config's; pad falls back to the first eos. A row that emitted an
    eos emits pad from then on. One compilation serves each (shapes, max_new_tokens,
    do_sample, top_k, top_p == 1.0 or not, number of eos ids); temperature, top_p, repetition_penalty, the
    params, ids and masks may be traced, the token-id settings are Python ints (TrlaxTypeError otherwise).
    min_new_tokens (static) bans the eos ids for that many steps, repetition_penalty
    (1.0 = off) rescales the logits of tokens already in the sequence and forced_eos_token_id
    (an int or a list; None = off) makes the last step (the max_new_tokens-th token) one of
    those ids, all as transformers' processors (`trlax.generation_config`). Seq2seq:
    decoder_input_ids [B, Td] (no padding) is a decoder prompt to continue; the start token is
    put in front when no row begins with it, as transformers does (a traced prompt, under jax.jit, is taken
    as it is: begin its rows with the start token).
    Returns GenerateOutput(sequences [B, T + new] int32 for causal LMs,
    [B, Td + new] for seq2seq LMs, Td = 1 without a decoder prompt). lora: a LoRA adapter
    tree (`trlax.peft`) applied on top of `params` (a LoRA policy's rollouts), or None.
    rollout_dtype: the loop's compute dtype (e.g. jnp.bfloat16: half the weight bytes per
    step, from float32 master params); None = the model's `dtype`. Weight matrices are
    cast to it once per call (see the module docstring); logits stay float32.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    refuse_traced_token_ids({"pad_token_id": pad_token_id, "eos_token_id": eos_token_id,
                             "decoder_start_token_id": decoder_start_token_id,
                             "forced_eos_token_id": forced_eos_token_id})
    if isinstance(do_sample, str) or np.ndim(do_sample) != 0:  # "no" would sample
        raise TrlaxTypeError(f"do_sample must be True or False; got {do_sample!r}")
    check_sampling(temperature, top_k, top_p, do_sample=do_sample)
    if do_sample:
        _check_key(prng_key)
    if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
        raise InputError(f"min_new_tokens must be an int >= 0; got {min_new_tokens!r}")
    _check_number("repetition_penalty", repetition_penalty)
    if (value := _scalar(repetition_penalty)) is not None and not value > 0:
        raise InputError(f"repetition_penalty must be > 0 (1.0 = off); got {repetition_penalty}")
    config = model.config
    seq2seq = bool(model.spec.is_encoder_decoder)
    input_ids = token_ids("input_ids", input_ids, model.vocab_size)
    if input_ids.shape[1] == 0:
        raise InputError("input_ids must hold at least one token per row; got shape (B, 0)")
    mask = mask_for("attention_mask", attention_mask, input_ids)
    if seq2seq:  # the encoder's input must fit a learned position table (BART)
        check_positions("input_ids", input_ids.shape[1], None, None, model.spec.position_limit(config),
                        model=config.model_type.upper())
    params = model.params if params is None else params
    model.check_params(params)

    if decoder_input_ids is not None and not seq2seq:
        raise InputError("decoder_input_ids are for encoder-decoder models; a causal LM continues input_ids")
    decoder_prompt = None if decoder_input_ids is None else token_ids("decoder_input_ids", decoder_input_ids,
                                                                      model.vocab_size)
    if decoder_prompt is not None and decoder_prompt.shape[0] != input_ids.shape[0]:
        raise InputError(f"decoder_input_ids has batch size {decoder_prompt.shape[0]} but input_ids has "
                         f"{input_ids.shape[0]}; they must match")
    start = decoder_start_id(config, decoder_start_token_id) if seq2seq else 0
    if seq2seq and start is None:
        raise InputError("seq2seq generate needs decoder_start_token_id (none on the model config)")
    if seq2seq:
        check_token_range("decoder_start_token_id", np.asarray(start), model.vocab_size)
        starts = on_device(np.full((input_ids.shape[0], 1), start), jnp.int32)
        if decoder_prompt is None:
            decoder_prompt = starts
        elif start_prepended(decoder_input_ids, start):
            decoder_prompt = jnp.concatenate([starts, decoder_prompt], axis=1)
    # Positions the loop feeds: the prompt (the decoder's, with its start token), then every new token but the last.
    prompt = decoder_prompt if seq2seq else input_ids
    length = prompt.shape[1] + max_new_tokens - 1
    limit = model.spec.position_limit(config)  # a learned position table; rotary / relative: none
    if limit is not None and length > limit:
        what = ("max_new_tokens" if decoder_input_ids is None else f"decoder prompt length {prompt.shape[1]} + "
                "max_new_tokens - 1") if seq2seq else f"prompt length {prompt.shape[1]} + max_new_tokens - 1"
        raise InputError(f"{what} = {length} exceeds the model's {limit} positions (the last new token is never "
                         "fed back); shorten the prompt or lower max_new_tokens")
    if not seq2seq:
        _check_prompt_mask(mask)

    eos_ids = id_list(eos_token_id if eos_token_id is not None else _config_value(config, "eos_token_id"))
    forced_eos = id_list(forced_eos_token_id)  # the last token must be one of them: ids of the vocabulary
    check_token_range("forced_eos_token_id", np.asarray(forced_eos, np.int64).reshape(1, -1), model.vocab_size)
    pad = pad_token_id if pad_token_id is not None else _config_value(config, "pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0  # without an eos no row finishes, so pad is never emitted
    # A row that emitted an eos (one of the vocabulary: tiny configs often name one outside it) emits pad, which is
    # fed back: an id of the vocabulary, as torch's embedding needs.
    if any(0 <= e < model.vocab_size for e in eos_ids):
        check_token_range("pad_token_id", np.asarray(pad, np.int64).reshape(1, 1), model.vocab_size)
    top_p_on = _scalar(top_p) != 1.0
    penalty_on = _scalar(repetition_penalty) != 1.0
    settings = GenerationSettings(int(max_new_tokens), bool(do_sample), int(top_k) if do_sample else 0,
                         bool(do_sample and top_p_on), len(eos_ids), int(min_new_tokens), penalty_on,
                         len(forced_eos), _check_rollout_dtype(rollout_dtype, model), model.sync_forward_config())
    knobs = _Knobs(*(on_device(value, dtype) for value, dtype in (
        (temperature, jnp.float32), (top_p, jnp.float32), (pad, jnp.int32), (np.reshape(eos_ids, -1), jnp.int32),
        (start, jnp.int32), (repetition_penalty, jnp.float32), (np.reshape(forced_eos, -1), jnp.int32))))

    run = model.generation_cache.get(settings, lambda: (_seq2seq_fn if seq2seq else _causal_fn)(model, settings))
    if model.mesh is not None:  # the batch is split like the layer outputs and the KV cache
        input_ids, mask = shard_batch((input_ids, mask), model.mesh, model.sharding_rules)
    extra = (decoder_prompt,) if seq2seq else ()
    with (explained_device_mismatch(f"this {type(model).__name__}"),
          live_params((params, lora), f"params of {model.check_params.what}")):
        sequences, finite = run(params, lora, input_ids, mask, knobs, prng_key if do_sample else None, *extra)
    # argmax and the draw would pick the last id of a NaN row silently
    if is_concrete(finite) and not jax.device_get(finite):
        raise InputError("generate: the model's logits hold NaN or inf, so no token can be chosen; the params hold "
                         "non-finite values (a diverged update?) or the compute dtype overflows (try float32 or "
                         "bfloat16)")
    return GenerateOutput(sequences=sequences)
