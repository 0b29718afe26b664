"""Rotary position embeddings (RoPE) exactly as transformers computes them.

Layout is HF's rotate-half: the rotary dims of a head are split into two halves that
rotate together, and cos/sin are ``cat(freqs, freqs)``. Checkpoints keep HF's q/k
projection layout, so no permutation is needed on load or save.

The inverse frequencies follow ``transformers/modeling_rope_utils.py`` (v5): the config's
``rope_parameters`` dict (``rope_type``, ``rope_theta``, ``factor``, ...), or the legacy
``rope_theta`` / ``rope_scaling`` attributes of an older config object. They are computed
with the same float32 operations as PyTorch (the power rounded from float64), so they agree
to within the last bit or two of torch's pow. YaRN and LongRoPE also scale cos and sin by an
attention factor (`attention_scaling`), which every family passes to `rotary_cos_sin`. LongRoPE
(Phi-3-128k, Phi-3.5, Phi-4-mini) has two sets of frequencies (`LongRopeFrequencies`); each call
picks one from its own positions, as transformers does. Dynamic NTK (`DynamicNtkFrequencies`) computes a
call's frequencies from its own longest position inside the traced call; transformers keeps the longest
length seen since the last call within the pretraining length, so the two differ only for a call shorter
than an earlier one and still past the pretraining length (generation and PPO's forwards never make one).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trlax.errors import UnsupportedModelError

Array = jax.Array

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_DEFAULT_THETA = 10_000.0


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with at least `rope_type` and `rope_theta`.

    transformers v5 configs carry `config.rope_parameters`; older config objects carry
    `rope_theta` and an optional `rope_scaling` dict (whose type key may be `type`).
    Per-layer-type nested dicts (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}})
    are read for the `layer_type` given, and refused without one. Beside flat keys (a Gemma 3
    config given a flat dict keeps it and adds the nested ones), the nested entry wins, as in
    transformers.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    params = {k: v for k, v in params.items() if not isinstance(v, dict)}
    if nested and (layer_type is not None or not params):
        if layer_type not in nested:
            raise UnsupportedModelError(
                f"per-layer-type RoPE parameters ({sorted(nested)}) are not supported by trlax for "
                f"{getattr(config, 'model_type', 'this model')} (layer type {layer_type!r}); "
                "use a config with one `rope_parameters` dict"
            )
        params = dict(nested[layer_type])
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or _DEFAULT_THETA
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # transformers' standardize_rope_params: a flat dict takes the config's own attribute (Phi-3 keeps the
        # pretraining length there), else keeps its value, else falls back to max_position_embeddings.
        original = getattr(config, "original_max_position_embeddings", None) if not nested else None
        if original is not None:
            params["original_max_position_embeddings"] = original
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


class LongRopeFrequencies(NamedTuple):
    """LongRoPE's two sets of inverse frequencies [rot_dim / 2] float32: a call whose largest position id + 1
    exceeds `original_max_position_embeddings` uses `long` for every position, any other call `short`
    (transformers' `longrope_frequency_update`; cached keys keep the set they were rotated with)."""

    short: np.ndarray
    long: np.ndarray
    original_max_position_embeddings: int


class DynamicNtkFrequencies(NamedTuple):
    """Dynamic NTK RoPE (transformers' `_compute_dynamic_ntk_parameters`): a call whose largest position id + 1,
    L, is at most `max_position_embeddings` uses `original` [dim / 2] float32; a longer one the frequencies of the
    base `theta * (factor * L / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))`, computed in
    float32 in the traced call (`dynamic_ntk_inv_freq`), as torch computes them from L."""

    original: np.ndarray
    theta: float
    factor: float
    max_position_embeddings: int
    dim: int


def longrope_length(config: Any) -> int | None:
    """The pretraining length (`original_max_position_embeddings`) of a config with LongRoPE, flat or for any
    layer type (the shortest); None without LongRoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [t for t, v in params.items() if isinstance(v, dict)]
    lengths = [int(rope_parameters(config, t)["original_max_position_embeddings"]) for t in nested or [None]
               if rope_parameters(config, t)["rope_type"] == "longrope"]
    return min(lengths, default=None)


def inv_frequencies(config: Any, head_dim: int, partial_rotary_factor: float = 1.0,
                    layer_type: str | None = None) -> np.ndarray | LongRopeFrequencies | DynamicNtkFrequencies:
    """Inverse frequencies [rot_dim / 2] float32, rot_dim = int(head_dim * partial_rotary_factor).

    Supports rope_type "default", "linear", "dynamic" (a `DynamicNtkFrequencies`), "llama3", "yarn" and
    "longrope" (the last two with a cos/sin scale, `attention_scaling`; longrope as a `LongRopeFrequencies`
    pair); any other type raises UnsupportedModelError. Matches transformers' ROPE_INIT_FUNCTIONS for those types.
    `layer_type` picks the entry of per-layer-type parameters (see `rope_parameters`).
    """
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported by trlax; supported rope types: "
            f"{list(SUPPORTED_ROPE_TYPES)}. Use a config with one of those in `rope_parameters`."
        )
    dim = int(head_dim * partial_rotary_factor)
    if rope_type == "yarn":
        # transformers reads `truncate` from the config's top-level dict, not a layer type's.
        top_level = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        return _yarn_frequencies(params, dim, config.max_position_embeddings, top_level.get("truncate", True))
    if rope_type == "longrope":
        return _longrope_frequencies(params, dim)
    if rope_type == "dynamic":
        return _dynamic_ntk_frequencies(params, dim, config.max_position_embeddings)
    inv_freq = base_inv_frequencies(params["rope_theta"], dim)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    return inv_freq.astype(np.float32)


def attention_scaling(config: Any, layer_type: str | None = None) -> float:
    """The factor transformers multiplies RoPE's cos and sin by: the config's `attention_factor`, else YaRN's
    `0.1 * log(factor) + 1` (or DeepSeek's mscale ratio) or LongRoPE's `sqrt(1 + log(factor) / log(original))`;
    1.0 for other types."""
    params = rope_parameters(config, layer_type)
    if params["rope_type"] not in ("yarn", "longrope"):
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _yarn_factor(params, config.max_position_embeddings)  # LongRoPE's too: max / original positions
    if params["rope_type"] == "longrope":
        original = params["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _rope_powers(theta: float, dim: int) -> np.ndarray:
    """`theta ** (arange(0, dim, 2) / dim)` [dim / 2] float32, as torch computes it.

    The same float32 exponent as torch, and the power rounded from float64, which is what torch's
    float32 pow returns to within its last bit (numpy's float32 pow is 1-2 ulps off, and the error
    grows with the position in the rotation angle).
    """
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)


def base_inv_frequencies(theta: float, dim: int) -> np.ndarray:
    """Unscaled inverse frequencies [dim / 2] float32: `1 / theta ** (arange(0, dim, 2) / dim)`."""
    return (np.float32(1.0) / _rope_powers(theta, dim)).astype(np.float32)


def partial_inv_frequencies(config: Any, head_dim: int) -> np.ndarray:
    """Inverse frequencies [rot_dim / 2] float32 of the rotated part of each head: the first
    `partial_rotary_factor` of it (v5's `rope_parameters` home of GPT-NeoX's `rotary_pct`; Phi, Phi-3)."""
    return inv_frequencies(config, head_dim, rope_parameters(config).get("partial_rotary_factor", 1.0))


def _llama3_scaling(inv_freq: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`)."""
    factor = np.float32(params["factor"])
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    # torch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar`; so do we, bit for bit.
    recip = (np.float32(1) / inv_freq).astype(np.float32)
    wavelen = recip * np.float32(2 * math.pi)  # [D/2] float32
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = (((np.float32(1) / wavelen) * np.float32(old_context_len) - np.float32(low_freq_factor))
              / np.float32(high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = (np.float32(1) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_factor(params: dict[str, Any], max_position_embeddings: int) -> float:
    """YaRN's context extension factor; without one, DeepSeek-V3's max / original positions."""
    if params.get("factor") is None:
        return max_position_embeddings / params["original_max_position_embeddings"]
    return params["factor"]


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's Eq. 21: `0.1 * mscale * log(factor) + 1` (1 without extension)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_frequencies(params: dict[str, Any], dim: int, max_position_embeddings: int, truncate: bool) -> np.ndarray:
    """YaRN's inverse frequencies [dim / 2] float32 (transformers' `_compute_yarn_parameters`): high
    frequencies kept, low ones divided by `factor`, a linear ramp between the correction dims."""
    theta, factor = params["rope_theta"], _yarn_factor(params, max_position_embeddings)
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    powers = _rope_powers(theta, dim)
    extrapolation = (np.float32(1.0) / powers).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * powers)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)  # 1: extrapolate (unchanged frequency)
    return (interpolation * (np.float32(1) - keep) + extrapolation * keep).astype(np.float32)


def _longrope_frequencies(params: dict[str, Any], dim: int) -> LongRopeFrequencies:
    """LongRoPE's short and long inverse frequencies (transformers' `_compute_longrope_parameters`):
    `1 / (factors * theta ** (arange(0, dim, 2) / dim))` with the config's `short_factor` / `long_factor`."""
    powers = _rope_powers(params["rope_theta"], dim)
    sets = {}
    for name in ("short_factor", "long_factor"):
        factors = np.asarray(params.get(name) or [], np.float32)
        if factors.shape != powers.shape:
            raise UnsupportedModelError(f"rope_type 'longrope' needs `{name}` with {dim // 2} numbers (rotary dims / "
                                        f"2) in `rope_parameters`; got {params.get(name)!r}")
        sets[name] = (np.float32(1.0) / (factors * powers)).astype(np.float32)
    return LongRopeFrequencies(sets["short_factor"], sets["long_factor"],
                               int(params["original_max_position_embeddings"]))


def _dynamic_ntk_frequencies(params: dict[str, Any], dim: int, max_positions: int) -> DynamicNtkFrequencies:
    """Dynamic NTK's frequencies at the pretraining length: the base as transformers computes it at init (with
    seq_len = max_position_embeddings, where the NTK factor is 1)."""
    factor = params.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise UnsupportedModelError(f"rope_type 'dynamic' needs a positive number `factor` in `rope_parameters` (how "
                                    f"far past max_position_embeddings the NTK base stretches); got {factor!r}")
    theta, factor = float(params["rope_theta"]), float(factor)
    base = theta * ((factor * max_positions / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return DynamicNtkFrequencies(base_inv_frequencies(base, dim), theta, factor, int(max_positions), dim)


def dynamic_ntk_inv_freq(frequencies: DynamicNtkFrequencies, length: Array) -> Array:
    """Inverse frequencies [dim / 2] float32 of a call whose largest position id + 1 is `length` (int [])."""
    f = frequencies
    ratio = (f.factor * length.astype(jnp.float32) / f.max_position_embeddings) - (f.factor - 1)  # float32 []
    base = f.theta * ratio ** (f.dim / (f.dim - 2))
    exponent = jnp.asarray(np.arange(0, f.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(f.dim))
    return jnp.where(length > f.max_position_embeddings, 1.0 / base**exponent, jnp.asarray(f.original))


def rotary_cos_sin(positions: Array, inv_freq: np.ndarray | Array | LongRopeFrequencies | DynamicNtkFrequencies,
                   interleaved: bool = False, scaling: float = 1.0) -> tuple[Array, Array]:
    """cos, sin [B, T, rot_dim] float32 for integer positions [B, T]: HF's rotate-half `cat(freqs, freqs)`,
    or with `interleaved` (GPT-J, Cohere) each frequency twice in a row (`repeat_interleave(freqs, 2)`);
    both multiplied by `scaling` (`attention_scaling`: YaRN's or LongRoPE's attention factor, else 1).
    LongRoPE's pair: the long set when the largest position + 1 exceeds the pretraining length; dynamic NTK:
    the frequencies of that length."""
    if isinstance(inv_freq, LongRopeFrequencies):
        long = jnp.max(positions) + 1 > inv_freq.original_max_position_embeddings
        inv_freq = jnp.where(long, jnp.asarray(inv_freq.long), jnp.asarray(inv_freq.short))
    elif isinstance(inv_freq, DynamicNtkFrequencies):
        inv_freq = dynamic_ntk_inv_freq(inv_freq, jnp.max(positions) + 1)
    inv_freq = jnp.asarray(inv_freq, jnp.float32)[(None,) * positions.ndim]  # [1, 1, D/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.repeat(freqs, 2, axis=-1) if interleaved else jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling  # times 1.0 (most types): exact, and folded away by XLA


def rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_every_two(x: Array) -> Array:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] over the last axis."""
    pairs = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1)  # [..., D/2, 2]
    return pairs.reshape(x.shape)


def apply_rotary(x: Array, cos: Array, sin: Array, interleaved: bool = False) -> Array:
    """Rotate x [B, T, H, D] by cos/sin [B, T, rot_dim]; returns x's shape and dtype.

    Rotate-half pairs (dims i and i + D/2), or with `interleaved` adjacent pairs (GPT-J, Cohere).
    With rot_dim < D (partial rotary: GPT-NeoX, Phi, GPT-J's `rotary_dim`) only the first rot_dim
    dims of each head rotate and the rest pass through. Like transformers, cos and sin are cast
    to x's dtype first and the rotation runs in that dtype (float32 in, float32 math; bfloat16
    in, bfloat16 math, as PyTorch does).
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rotary(x[..., :rot], cos, sin, interleaved), x[..., rot:]], axis=-1)
    cos = cos.astype(x.dtype)[:, :, None, :]  # [B, T, 1, D]
    sin = sin.astype(x.dtype)[:, :, None, :]
    return x * cos + (rotate_every_two(x) if interleaved else rotate_half(x)) * sin
