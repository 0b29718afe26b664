"""Which dtype a checkpoint stores, and casting a state dict to the dtype a save writes.

A checkpoint's storage dtype is the dtype most of its floating-point bytes are in (a bf16
model may keep a few float32 buffers). trlax records it at load, so a model loaded from
bf16 files saves bf16 files by default, while training runs on float32 master weights.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# The float dtypes a save writes: those transformers loads (float64: a float64 checkpoint saved "auto").
SAVE_DTYPES = ("float32", "bfloat16", "float16", "float64")


class TensorSource(Protocol):
    """What `stored_float_dtype` reads: a CheckpointReader or an in-memory state dict reader."""

    def keys(self) -> list[str]: ...

    def dtype(self, key: str) -> np.dtype: ...

    def nbytes(self, key: str) -> int: ...

    def get(self, key: str) -> np.ndarray: ...


def is_float(dtype: Any) -> bool:
    """Whether `dtype` (a dtype, a scalar type or a name) is a floating-point dtype; False for a non-dtype."""
    try:
        return jnp.issubdtype(np.dtype(dtype), jnp.floating)
    except TypeError:
        return False


def held_dtype(dtype: Any) -> np.dtype:
    """The dtype JAX holds arrays of `dtype` in: float64 is float32 unless `jax_enable_x64` is on."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float64 and not jax.config.jax_enable_x64 else dtype


def stored_float_dtype(source: TensorSource, keys: Iterable[str] | None = None) -> np.dtype | None:
    """The floating dtype holding most of the bytes of `keys` (default: every tensor); None without floats.

    Read from the headers (dtype and size per tensor): no tensor data is read.
    """
    sizes: Counter[np.dtype] = Counter()
    for key in source.keys() if keys is None else keys:
        dtype = np.dtype(source.dtype(key))
        if is_float(dtype):
            sizes[dtype] += source.nbytes(key)
    return sizes.most_common(1)[0][0] if sizes else None


def params_float_dtype(leaves: Iterable[Any]) -> np.dtype | None:
    """The floating dtype holding most of the bytes of some arrays (e.g. a param tree's leaves)."""
    sizes: Counter[np.dtype] = Counter()
    for leaf in leaves:
        if is_float(leaf.dtype):
            sizes[np.dtype(leaf.dtype)] += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return sizes.most_common(1)[0][0] if sizes else None


def key_dtype(key: str, dtype: Any, float32_keys: tuple[str, ...] = ()) -> Any:
    """The dtype a save writes HF tensor `key` in: `dtype`, but float32 for a key matching a `float32_keys`
    regex when `dtype` is float16 (what a float16 transformers model holds there, e.g. T5's `wo`)."""
    if dtype is not None and np.dtype(dtype) == np.float16 and any(re.search(p, key) for p in float32_keys):
        return np.dtype(np.float32)
    return dtype


def cast_floats(state: Mapping[str, np.ndarray], dtype: Any,
                float32_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every floating tensor of `state` in `dtype` (see `key_dtype`; others, e.g. int buffers, unchanged)."""
    dtype = np.dtype(jnp.dtype(dtype))
    out = {}
    for key, a in state.items():
        want = key_dtype(key, dtype, float32_keys)
        out[key] = np.asarray(a).astype(want) if is_float(a.dtype) and a.dtype != want else a
    return out
