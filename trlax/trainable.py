"""Split params by a trainable mask, so train steps donate only what they update.

After `create_reference_model(policy, num_shared_layers=N)` the policy's frozen leaves
are the very arrays the reference holds. Donating them (`jax.jit(...,
donate_argnums=...)` over the whole params) would delete the reference's arrays, so a
train step takes two halves:

    trainable, frozen = trlax.split_trainable(policy.params, policy.trainable_mask)
    opt_state = tx.init(trainable)        # no optimizer state for frozen leaves
    step = jax.jit(update, donate_argnums=(0, 2))  # (trainable, frozen, opt_state, batch)
    trainable, opt_state = step(trainable, frozen, opt_state, batch)
    policy.params = trlax.merge_trainable(trainable, frozen)

Each half keeps the full tree structure with `None` where the other half has its
leaves; `None` is an empty pytree node, so jit, grad and optax skip it for free.

On a mesh, `jit_keeping_placement(update, kept=(0, 2), outputs=..., donate_argnums=(0, 2))`
in place of `jax.jit` keeps the new trainable params and optimizer state where the sharding
rules put the old ones; commit the optimizer state to the mesh first
(`trlax.sharding.committed(tx.init(trainable), mesh)`: `tx.init`'s step count lies on one
device, comes out of the first step replicated, and the second step then compiles again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

from trlax.errors import TrlaxError, TrlaxTypeError


def _check_mask(params: Any, mask: Any) -> None:
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(mask):
        raise TrlaxError("the trainable mask must have exactly the params' tree structure (one bool per leaf); "
                         "use model.trainable_mask for model.params")
    check_mask_leaves(mask)


def check_mask_leaves(mask: Any) -> None:
    """TrlaxTypeError unless every leaf of a trainable mask is one bool (a string "False" counted as trainable,
    a per-element array failed inside optax)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if np.ndim(leaf) != 0 or np.asarray(leaf).dtype != np.bool_:
            raise TrlaxTypeError(f"the trainable mask must hold one bool per params leaf; at "
                                 f"{jax.tree_util.keystr(path)} it holds {type(leaf).__name__} {leaf!r}")


def split_trainable(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like `params`, leaves where `mask` is True / False, else None."""
    _check_mask(params, mask)
    trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def merge_trainable(trainable: Any, frozen: Any) -> Any:
    """The inverse of `split_trainable`: one tree with every leaf from whichever half holds it."""
    halves = [jax.tree_util.tree_structure(half, is_leaf=lambda x: x is None) for half in (trainable, frozen)]
    if halves[0] != halves[1]:
        raise TrlaxError("trainable and frozen must be the two halves of one split_trainable call: trees of the "
                         "params' structure, each with None where the other holds the leaf; these differ")

    def pick(t: Any, f: Any) -> Any:
        if (t is None) == (f is None):
            raise TrlaxError("trainable and frozen must come from one split_trainable call: a leaf is "
                             f"{'in neither half' if t is None else 'in both halves'}")
        return f if t is None else t

    return jax.tree_util.tree_map(pick, trainable, frozen, is_leaf=lambda x: x is None)


def masked_optimizer(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`tx` on the leaves where `mask` is True; zero updates and no state for the others.

    For training over the whole params tree (no split). `optax.masked` alone would pass
    the frozen leaves' raw gradients through as updates; here they are zeroed
    (`optax.set_to_zero`, stateless), and `tx`'s state (e.g. Adam's mu and nu) is only
    allocated for the trainable leaves.
    """
    check_mask_leaves(mask)
    labels = jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask)
    inner = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)

    def init(params: Any) -> Any:
        _check_mask(params, mask)  # optax's own error on another tree is a bare pytree mismatch
        return inner.init(params)

    return inner._replace(init=init)


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (each leaf counted once per occurrence)."""
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes"))


def unique_buffer_bytes(*trees: Any) -> int:
    """Bytes of the distinct device buffers behind the leaves of `trees` (shared arrays counted once)."""
    seen: dict[tuple[Any, ...], int] = {}
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                key = (shard.device, shard.data.unsafe_buffer_pointer())
                seen[key] = shard.data.nbytes
    return sum(seen.values())


def placement_of(tree: Any) -> Any:
    """Each leaf's mesh placement (its NamedSharding), None for a leaf on no mesh: as `jax.jit` out_shardings,
    "keep the mesh leaves where they are, let XLA place the rest"."""
    def placement(x: Any) -> NamedSharding | None:
        sharding = getattr(x, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) else None

    return jax.tree_util.tree_map(placement, tree)


def jit_keeping_placement(fn: Callable[..., tuple[Any, ...]], kept: tuple[int, ...], outputs: int,
                          **jit_kwargs: Any) -> Callable[..., tuple[Any, ...]]:
    """`jax.jit(fn, **jit_kwargs)` (fn returning a tuple of `outputs` values) whose output i comes out placed as
    argument `kept[i]` is (`placement_of`); the other outputs where XLA's propagation puts them.

    A train step's new params and optimizer state otherwise come out where propagation puts them, which differs
    from the sharding rules they were placed by (a 2 x 2 fsdp/data mesh left GPT-2's biases and norm scales
    fsdp-sharded where the rules replicate them), and the next step then compiles again for that placement.
    One compiled function per placement of the kept arguments; leaves on no mesh are left to XLA (commit them
    with `trlax.sharding.committed` for one placement from the first call on). The returned function takes
    positional arguments only.
    """
    if not kept or any(not isinstance(i, int) or i < 0 for i in kept) or outputs < len(kept):
        raise TrlaxTypeError(f"jit_keeping_placement needs kept: argument positions (ints >= 0), one per leading "
                             f"output, and outputs >= len(kept); got kept={kept!r}, outputs={outputs!r}")
    compiled: dict[Any, Callable[..., tuple[Any, ...]]] = {}

    def call(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        if kwargs:
            raise TrlaxTypeError(f"a step jitted with jit_keeping_placement takes positional arguments only; got "
                                 f"{sorted(kwargs)} as keywords")
        if max(kept) >= len(args):
            raise TrlaxTypeError(f"{getattr(fn, '__name__', 'the step')} got {len(args)} positional argument(s); "
                                 f"jit_keeping_placement keeps the placement of arguments {kept}: pass them "
                                 "positionally")
        placements = tuple(placement_of(args[i]) for i in kept)
        leaves, treedef = jax.tree_util.tree_flatten(placements, is_leaf=lambda x: x is None)
        key = (tuple(leaves), treedef)
        if key not in compiled:
            compiled[key] = jax.jit(fn, out_shardings=(*placements, *[None] * (outputs - len(kept))), **jit_kwargs)
        return compiled[key](*args)

    return call
