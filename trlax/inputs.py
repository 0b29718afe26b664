"""Checks on what callers pass to a model: token ids, masks and positions, before anything is compiled."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from trlax.errors import TrlaxError


class InputError(TrlaxError):
    """Model inputs of the wrong shape, dtype or range."""


def token_ids(name: str, ids: Any) -> jax.Array:
    """input_ids-like arguments: an integer array [B, T], returned as int32."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2:
        raise InputError(f"{name} must be a 2-D [batch, seq_len] array of token ids; got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(f"{name} must hold integer token ids; got dtype {ids.dtype}")
    return ids.astype(jnp.int32)


def same_shape(name: str, value: Any, shape: tuple[int, ...]) -> jax.Array:
    """A mask or position array with the shape of its ids, returned as int32."""
    value = jnp.asarray(value)
    if value.shape != shape:
        raise InputError(f"{name} must have the shape of its ids {shape}; got {value.shape}")
    return value.astype(jnp.int32)


def mask_for(name: str, mask: Any, ids: jax.Array) -> jax.Array:
    """The attention mask [B, T] int32 of `ids`: the given one (checked) or all ones."""
    return jnp.ones_like(ids) if mask is None else same_shape(name, mask, ids.shape)
