"""transformers' language-modelling losses, for `labels=` in the forward passes.

Causal LMs (`ForCausalLMLoss`): the logits at position t predict the label at t + 1, so
the labels are shifted left by one and the last position predicts nothing; encoder-decoder
LMs (T5, BART) compare each decoder position's logits with its own label. Labels equal to
-100 are ignored, and the loss is the mean negative log-likelihood over the others (NaN
when every label is ignored, as torch's cross-entropy gives). Pure jnp: fine under jit and grad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trlax.inputs import IGNORE_INDEX


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T] float32, valid [B, T] bool) of labels [B, T] under logits [B, T, V].

    Ignored labels (-100) get a valid flag of False (and a finite nll that callers mask out).
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B, T]
    return jax.nn.logsumexp(logits, axis=-1) - picked, valid


def masked_mean_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean nll [] float32 over the labels that are not -100 (logits and labels aligned)."""
    nll, valid = token_nll(logits, labels)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid, dtype=jnp.float32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' causal-LM loss []: logits [B, T, V] at t scored against labels [B, T] at t + 1."""
    return masked_mean_nll(logits[:, :-1], labels[:, 1:])


def seq2seq_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' encoder-decoder loss []: decoder logits [B, Td, V] against labels [B, Td], unshifted."""
    return masked_mean_nll(logits, labels)


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """decoder_input_ids [B, Td] from labels [B, Td], as T5's `_shift_right` and BART's
    `shift_tokens_right`: the start token, then the labels without their last one, -100 -> pad."""
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE_INDEX, jnp.asarray(pad_token_id, labels.dtype), shifted)
