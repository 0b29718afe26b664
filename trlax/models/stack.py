"""The layer stack every family shares: blocks named like a torch ModuleList, one loop over them.

The loop threads the hidden state through the blocks, hands each block its slice of the
KV cache, collects the per-layer hidden states transformers returns, and pins each
block's output to the batch split when a mesh asks for it (`batch_constraint`), and
rematerialises each block in the backward pass when gradient checkpointing is on
(`remat_blocks`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax

from trlax.models.cache import KVCache

Array = jax.Array

# Set by trlax.sharding while a model is traced on a mesh: pins an activation [B, ...] to the batch split.
_BATCH_CONSTRAINT: contextvars.ContextVar[Callable[[Array], Array] | None] = contextvars.ContextVar(
    "trlax_batch_constraint", default=None)


@contextlib.contextmanager
def batch_constraint(constrain: Callable[[Array], Array] | None) -> Iterator[None]:
    """While tracing under this context, every block's output goes through `constrain` (None: untouched)."""
    token = _BATCH_CONSTRAINT.set(constrain)
    try:
        yield
    finally:
        _BATCH_CONSTRAINT.reset(token)


# Set by `FlaxPreTrainedModel.apply_module` from the model's gradient-checkpointing setting.
_GRADIENT_CHECKPOINTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "trlax_gradient_checkpointing", default=False)


@contextlib.contextmanager
def remat_blocks(enabled: bool) -> Iterator[None]:
    """While tracing under this context, every block is rematerialised (`nn.remat`) if `enabled`."""
    token = _GRADIENT_CHECKPOINTING.set(enabled)
    try:
        yield
    finally:
        _GRADIENT_CHECKPOINTING.reset(token)


def rematerialised(block: nn.Module, x: Array, **inputs: Any) -> tuple[Array, KVCache | None]:
    """`block(x, **inputs)` (x: [B, T, H]) with its activations recomputed in the backward pass instead of stored.

    Only `x` is an argument of the lifted `nn.remat`; `inputs` (masks keyed by window, the
    `deterministic` flag, None entries) are closed over, so nothing in them has to be an
    array. The block's params keep their paths (the lift adds no scope).
    """
    return nn.remat(lambda module, h: module(h, **inputs))(block, x)


class LayerStack(nn.Module):
    """`num_layers` blocks named "0", "1", ... (param paths read `transformer.h.0.attn...` as in PyTorch).

    Each block is `make_block(layer_idx=i)` and is called as
    `block(x, cache=<its cache>, **inputs) -> (x, cache)`, rematerialised under
    `remat_blocks(True)`.
    """

    make_block: Callable[..., nn.Module]
    num_layers: int

    def setup(self) -> None:
        self.blocks = [self.make_block(layer_idx=i, name=str(i)) for i in range(self.num_layers)]

    def __call__(
        self, x: Array, *, cache: list[KVCache] | None, output_hidden_states: bool, **inputs: Any
    ) -> tuple[Array, tuple[Array, ...] | None, list[KVCache] | None]:
        """x: [B, T, H] -> (x after the last block, each block's input if output_hidden_states, new cache)."""
        constrain = _BATCH_CONSTRAINT.get()
        remat = _GRADIENT_CHECKPOINTING.get()
        hidden: list[Array] = []
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.blocks):
            hidden.append(x)
            layer_cache = None if cache is None else cache[i]
            if remat:
                x, layer_cache = rematerialised(block, x, cache=layer_cache, **inputs)
            else:
                x, layer_cache = block(x, cache=layer_cache, **inputs)
            if constrain is not None:
                x = constrain(x)
            new_cache.append(layer_cache)
        return x, tuple(hidden) if output_hidden_states else None, new_cache if cache is not None else None


def layer_stack(block_cls: type[nn.Module], num_layers: int, name: str, **kwargs: Any) -> LayerStack:
    """A LayerStack of `block_cls(layer_idx=i, **kwargs)` named `name` (the ModuleList's name in PyTorch)."""
    return LayerStack(functools.partial(block_cls, **kwargs), num_layers, name=name)
