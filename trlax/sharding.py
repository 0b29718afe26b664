"""Sharding over a device mesh: each param gets logical axes, logical axes map to mesh axes.

Two tables, MaxText style:

- *param rules*: an ordered list of (regex on the param path, logical axis per dim). The
  path is the pytree path joined by "/" (`pretrained_model/transformer/h/0/attn/c_attn/kernel`),
  searched with `re.search`, so a rule written for the bare LM also matches inside the
  value-head wrapper, an optimizer state (`opt_state/0/mu/...`) or a checkpoint tree. A
  rule applies when its regex matches *and* it names one axis per dim of the leaf; the
  first that applies wins; a leaf no rule fits is replicated.
- *logical -> mesh*: `batch -> (data, fsdp)`, `embed -> fsdp`, `heads/kv_heads/mlp/vocab -> tp`,
  `expert -> expert` (the expert dim of mixture-of-experts weights; `make_mesh(expert=N)`
  adds that mesh axis).
  Mesh axes the mesh does not have are ignored, and an axis that does not divide the
  dimension is dropped for that tensor (GPT-2's vocabulary of 50257 stays whole).

Kernels are [in, out]: column-parallel projections (q/k/v, MLP in) are (embed, heads|mlp),
row-parallel ones (attention out, MLP out) (heads|mlp, embed); embeddings (vocab, embed);
norms and the remaining biases are replicated. A LoRA adapter follows its base kernel:
`lora_A` [in, r] takes the kernel's in-axis, `lora_B` [r, out] its out-axis.

Sharding changes where numbers live, never the math: any rule set gives the same results
up to float reassociation.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from trlax.errors import TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.models.registry import spec_for_type
from trlax.models.spec import ParamRule
from trlax.models.stack import batch_constraint

LogicalAxes = tuple[str | None, ...]
logger = logging.getLogger("trlax")

MESH_AXES = ("data", "fsdp", "tp")

# Logical axis -> mesh axes, tried in order (an axis is kept only if it divides the dim).
DEFAULT_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tp",),
    "heads": ("tp",),
    "kv_heads": ("tp",),
    "mlp": ("tp",),
    "length": (),
    "head_dim": (),
    "expert": ("expert",),
}

# Keyed by leaf role (module name + leaf): tried after the family's rules (its SPEC's
# `sharding_rules`), for what every family shares (LM head, value head, reward score head)
# and for a family without a rule of its own for some leaf.
GENERIC_RULES: tuple[ParamRule, ...] = (
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)v_head/summary/kernel$", ("embed", None)),
    (r"(^|/)(q_proj|k_proj|v_proj|query|key|value|query_key_value|qkv_proj|c_attn)/kernel$", ("embed", "heads")),
    (r"(^|/)(q_proj|k_proj|v_proj|query|key|value|query_key_value|qkv_proj|c_attn)/bias$", ("heads",)),
    (r"(^|/)(o_proj|out_proj|attention/dense|attn/c_proj)/kernel$", ("heads", "embed")),
    (r"(^|/)(gate_proj|up_proj|fc1|fc_in|c_fc|dense_h_to_4h)/kernel$", ("embed", "mlp")),
    (r"(^|/)(gate_proj|up_proj|fc1|fc_in|c_fc|dense_h_to_4h)/bias$", ("mlp",)),
    (r"(^|/)(down_proj|fc2|fc_out|mlp/c_proj|dense_4h_to_h)/kernel$", ("mlp", "embed")),
    (r"embedding$", ("vocab", "embed")),
    (r"kernel$", ("embed", None)),  # any other projection: FSDP over its input dim
)

_LORA_LEAF = re.compile(r"^(?P<base>.*)/lora_(?P<which>[AB])$")


@dataclass(frozen=True)
class ShardingRules:
    """Param rules (tried in order) and the logical -> mesh axes map.

    Pass one to `from_pretrained(..., sharding_rules=...)` to override the defaults: its
    `params` are tried before the family's rules, its `logical` entries replace the
    default entries of the same name (see `resolve_rules`).
    """

    params: tuple[ParamRule, ...] = ()
    logical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    resolved: bool = False  # True once merged with the defaults (by `resolve_rules`)


def resolve_rules(
    model_type: str | None = None, overrides: ShardingRules | Sequence[ParamRule] | None = None
) -> ShardingRules:
    """The full rule set: user overrides first, then the family's rules, then the generic ones.

    `overrides` is a ShardingRules or a plain sequence of (regex, logical axes) pairs; an
    already resolved ShardingRules is returned as it is.
    """
    if isinstance(overrides, ShardingRules) and overrides.resolved:
        return overrides
    if overrides is None:
        overrides = ShardingRules()
    elif not isinstance(overrides, ShardingRules):
        if isinstance(overrides, (str, Mapping)) or not isinstance(overrides, Sequence):
            raise TrlaxTypeError(f"sharding_rules must be a ShardingRules or a list of (regex, logical axes) pairs; "
                                 f"got {type(overrides).__name__}")
        overrides = ShardingRules(params=tuple(overrides))
    family = _family_rules(model_type)
    params = tuple(_checked_rule(rule) for rule in overrides.params)
    logical = {**DEFAULT_LOGICAL_AXES, **{k: _as_axes(v) for k, v in overrides.logical.items()}}
    return ShardingRules(params=(*params, *family, *GENERIC_RULES), logical=logical, resolved=True)


def _checked_rule(rule: Any) -> ParamRule:
    """A user's (regex, logical axes) pair, or a TrlaxTypeError naming it."""
    example = "e.g. (r'(^|/)wte/embedding$', ('vocab', 'embed'))"
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str) or isinstance(
            rule[1], str) or not isinstance(rule[1], Sequence) or not all(a is None or isinstance(a, str)
                                                                          for a in rule[1]):
        raise TrlaxTypeError(f"sharding rule {rule!r} is not a (regex, logical axes) pair of a str and a tuple of "
                             f"axis names or None ({example})")
    try:
        re.compile(rule[0])
    except re.error as e:
        raise TrlaxError(f"sharding rule {rule!r}: {rule[0]!r} is not a regular expression ({e})") from e
    return rule[0], tuple(rule[1])


def check_mesh(mesh: Mesh, rules: ShardingRules) -> None:
    """TrlaxError when the rules would leave the mesh unused: they name mesh axes it lacks (other than
    trlax's own), or none of its axes with more than one device (every param and batch replicated on all of
    them). An unused axis beside used ones gets a warning (params are replicated over it)."""
    unknown = sorted({axis for axes in rules.logical.values() for axis in axes} - set(mesh.axis_names)
                     - {*MESH_AXES, "expert"})
    if unknown:
        raise TrlaxError(f"the sharding rules map logical axes to mesh axes {unknown}, which this mesh lacks (its "
                         f"axes: {list(mesh.axis_names)}); fix ShardingRules.logical")
    # Mesh axes in use: those of the logical axes some param rule or the KV cache names, and the batch's (a
    # dense family's rules name no `expert`, so an expert axis splits nothing there).
    named = {axis for _, axes in rules.params for axis in axes if axis is not None} | {"batch"}
    named |= {axis for axis in KV_CACHE_AXES if axis is not None}
    mapped = {axis for logical, axes in rules.logical.items() if logical in named for axis in axes}
    split = [axis for axis in mesh.axis_names if mesh.shape[axis] > 1]
    if split and not set(split) & mapped:
        raise TrlaxError(f"no axis of this mesh {dict(mesh.shape)} is one the sharding rules use ({sorted(mapped)}): "
                         f"every param and batch would be replicated on all {mesh.size} devices; build it with "
                         "trlax.make_mesh(data=, fsdp=, tp=) or map its axes in ShardingRules(logical=...)")
    if unused := [axis for axis in split if axis not in mapped]:
        logger.warning("mesh axes %s are not used by the sharding rules: params are replicated over them", unused)


def _family_rules(model_type: str | None) -> tuple[ParamRule, ...]:
    """The SPEC's rules of the family that implements `model_type` (none for an unknown type)."""
    if model_type is None:
        return ()
    try:
        return spec_for_type(model_type).sharding_rules
    except UnsupportedModelError:
        return ()


def _as_axes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else None
    if axes is None or not all(isinstance(axis, str) for axis in axes):
        raise TrlaxTypeError(f"ShardingRules.logical values are mesh axis names (a str, a tuple of them, or None); "
                             f"got {value!r}")
    return axes


@lru_cache(maxsize=64)
def _compiled(params: tuple[ParamRule, ...]) -> tuple[tuple[re.Pattern[str], LogicalAxes], ...]:
    return tuple((re.compile(pattern), tuple(axes)) for pattern, axes in params)


def logical_axes(path: str, ndim: int, rules: ShardingRules) -> LogicalAxes:
    """The logical axes of the leaf at `path` ("a/b/kernel") with `ndim` dims; all None if no rule fits."""
    lora = _LORA_LEAF.match(path)
    if lora and ndim == 2:  # A [in, r] / B [r, out] follow the kernel they adapt
        base_in, base_out = logical_axes(f"{lora['base']}/kernel", 2, rules)
        return (base_in, None) if lora["which"] == "A" else (None, base_out)
    for pattern, axes in _compiled(rules.params):
        if len(axes) == ndim and pattern.search(path):
            return axes
    return (None,) * ndim


def spec_for(axes: LogicalAxes, shape: Sequence[int], mesh: Mesh, rules: ShardingRules) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` with these logical axes on `mesh`.

    Each logical axis takes its mesh axes in order, skipping those the mesh lacks, those
    of size 1, those already used by an earlier dim, and those that would not divide the dim evenly.
    """
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape, strict=True):
        if name is None:
            entries.append(None)
            continue
        if name not in rules.logical:
            raise TrlaxError(f"logical axis {name!r} has no mesh mapping; known logical axes: "
                             f"{sorted(rules.logical)} (add it to ShardingRules.logical)")
        chosen: list[str] = []
        size = 1
        for axis in rules.logical[name]:
            n = mesh.shape.get(axis, 1)
            if n > 1 and axis not in used and dim % (size * n) == 0:
                chosen.append(axis)
                size *= n
        used.update(chosen)
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path (from `jax.tree_util.tree_flatten_with_path`) or a tuple of names as "a/b/c"."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)


def leaf_sharding(path: str, shape: Sequence[int], mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    """The NamedSharding of one leaf, from its path and shape."""
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape), rules), shape, mesh, rules))


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with every axis of type Auto (GSPMD decides intermediate layouts).

    `jax.make_mesh` makes Explicit axes by default; trlax's models leave activation
    layouts to the compiler, which needs Auto axes.
    """
    if not isinstance(mesh, Mesh):
        raise TrlaxTypeError(f"mesh must be a jax.sharding.Mesh (e.g. trlax.make_mesh(fsdp=-1)); got {mesh!r}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def make_mesh(data: int = 1, fsdp: int = -1, tp: int = 1, devices: Sequence[Any] | None = None, *,
              expert: int = 1) -> Mesh:
    """A ("data", "fsdp", "tp") mesh over `devices` (default: all); one size may be -1 (the rest).

    `expert` > 1 adds an "expert" axis (("data", "fsdp", "expert", "tp")) that splits the
    experts of mixture-of-experts weights (logical axis `expert`); other params and the
    batch do not use it. With several processes (`jax.distributed.initialize`),
    `jax.devices()` lists every device of every host, so the same call builds the global
    mesh on each host.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = (*MESH_AXES[:2], "expert", MESH_AXES[2]) if expert != 1 else MESH_AXES
    sizes = [data, fsdp, expert, tp] if expert != 1 else [data, fsdp, tp]
    shown = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise TrlaxError(f"at most one mesh axis size may be -1; got {shown}")
    if any(s < 1 and s != -1 for s in sizes):
        raise TrlaxError(f"mesh axis sizes must be >= 1 (or one -1: the rest of the devices); got {shown}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise TrlaxError(f"{len(devices)} devices cannot be split into {shown}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        shown = " x ".join(f"{n}={s}" for n, s in zip(names, sizes, strict=True))
        raise TrlaxError(f"mesh {shown} needs {int(np.prod(sizes))} devices; there are {len(devices)}")
    return Mesh(np.array(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def tree_shardings(
    tree: Any, mesh: Mesh, rules: ShardingRules | Sequence[ParamRule] | None = None, model_type: str | None = None,
) -> Any:
    """A pytree of NamedSharding matching `tree` (arrays or ShapeDtypeStructs).

    Works for any params tree: the LM's, the value-head wrapper's (`pretrained_model`,
    `v_head`), LoRA collections, optax states, checkpoint trees.
    """
    rules = resolve_rules(model_type, rules)
    mesh = auto_mesh(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_sharding(path_str(path), np.shape(leaf), mesh, rules), tree)


# The arrays `shard_params` moved: (id of the source array, its target sharding) -> a weak reference to the array
# it was moved to. An entry goes when its source array goes; it keeps neither array alive.
MOVED: dict[tuple[int, NamedSharding], weakref.ref] = {}


def already_moved(leaf: Any, sharding: NamedSharding) -> jax.Array | None:
    """The live, undeleted array `shard_params` moved `leaf` to with `sharding`, if any."""
    moved = MOVED.get((id(leaf), sharding))
    array = None if moved is None else moved()
    return None if array is None or array.is_deleted() else array


def shard_params(
    params: Any, mesh: Mesh, rules: ShardingRules | Sequence[ParamRule] | None = None, model_type: str | None = None,
) -> Any:
    """`params` moved into their sharded layout (a new tree; the input is left as it is).

    An array moved before to the same sharding is not moved again: the tree gets the array it was moved to
    (unless that one is gone or a donating step deleted it). So a leaf two models hold (a reference's layers
    shared with its policy) stays one array when each model is sharded, in either order.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shardings = treedef.flatten_up_to(tree_shardings(params, mesh, rules, model_type))
    out = [already_moved(leaf, sharding) for leaf, sharding in zip(leaves, shardings, strict=True)]
    todo = [i for i, leaf in enumerate(out) if leaf is None]
    placed = jax.device_put([leaves[i] for i in todo], [shardings[i] for i in todo])
    for i, array in zip(todo, placed, strict=True):
        out[i] = array
        if isinstance(leaves[i], jax.Array) and array is not leaves[i]:
            key = (id(leaves[i]), shardings[i])
            MOVED[key] = weakref.ref(array)
            weakref.finalize(leaves[i], MOVED.pop, key, None)
    return jax.tree_util.tree_unflatten(treedef, out)


def make_placer(
    mesh: Mesh, rules: ShardingRules | Sequence[ParamRule] | None = None, model_type: str | None = None,
) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
    """A loader `place` hook: build each tensor straight into its sharded layout.

    Each device receives a fresh copy of only its own slice (`make_array_from_callback`),
    so no device buffer aliases the checkpoint's memory map and the host never holds
    more than the tensor being read plus the slices it is placing. The mesh and rules are a model's
    (`FlaxPreTrainedModel.placer`), which `use_mesh` checked (`check_mesh`).
    """
    mesh = auto_mesh(mesh)
    rules = resolve_rules(model_type, rules)

    def place(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
        sharding = leaf_sharding("/".join(path), array.shape, mesh, rules)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: np.array(array[index]))

    return place


def shard_batch(tree: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Put arrays [B, ...] (ids, masks, rollouts) with B split over the `batch` mesh axes."""
    rules = resolve_rules(None, rules)
    mesh = auto_mesh(mesh)

    def put(leaf: Any) -> jax.Array:
        shape = np.shape(leaf)
        axes = ("batch", *(None,) * (len(shape) - 1)) if shape else ()
        return jax.device_put(leaf, NamedSharding(mesh, spec_for(axes, shape, mesh, rules)))

    return jax.tree_util.tree_map(put, tree)


# A KV cache leaf [B, Hkv, S, D]: split the batch like the inputs and the heads like k/v_proj.
KV_CACHE_AXES: LogicalAxes = ("batch", "kv_heads", "length", "head_dim")


def kv_cache_shardings(cache: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """NamedShardings for a KV cache pytree (4-D leaves [B, Hkv, S, D]; others replicated)."""
    rules = resolve_rules(None, rules)
    mesh = auto_mesh(mesh)

    def one(leaf: Any) -> NamedSharding:
        shape = np.shape(leaf)
        axes = KV_CACHE_AXES if len(shape) == 4 else (None,) * len(shape)
        return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))

    return jax.tree_util.tree_map(one, cache)


def constrain_kv_cache(cache: Any, mesh: Mesh | None, rules: ShardingRules | None = None) -> Any:
    """Inside jit: pin a KV cache to its mesh layout (no-op without a mesh)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, kv_cache_shardings(cache, mesh, rules))


def constrain_batch(x: jax.Array, mesh: Mesh, rules: ShardingRules | None = None) -> jax.Array:
    """Inside jit: pin an activation [B, ...] to batch sharding (the other dims left to the compiler)."""
    rules = resolve_rules(None, rules)
    axes = ("batch", *(None,) * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(auto_mesh(mesh), spec_for(axes, x.shape, mesh, rules)))


def activation_sharding(mesh: Mesh | None, rules: ShardingRules | None = None
                        ) -> contextlib.AbstractContextManager[None]:
    """While tracing a model under this context, every layer's output hidden state is batch-sharded.

    Params alone do not tell the compiler how to split the work: with FSDP-sharded
    kernels it would rather split every matmul over the hidden size and keep the whole
    batch on each device. Pinning each block's output [B, T, H] to the `batch` mesh axes
    makes it gather the kernels instead and keep the batch split (FSDP / data parallel).
    The families' shared layer loop (`trlax.models.stack.LayerStack`) applies the pin.
    No-op without a mesh.
    """
    if mesh is None:
        return contextlib.nullcontext()
    return batch_constraint(lambda x: constrain_batch(x, mesh, rules))


def describe(tree: Any) -> dict[str, str]:
    """path -> "shape spec" for every array leaf: what a test or a user checks a layout with."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = leaf.sharding.spec if isinstance(getattr(leaf, "sharding", None), NamedSharding) else "unsharded"
        out[path_str(path)] = f"{tuple(leaf.shape)} {spec}"
    return out


def shard_model(model: Any, mesh: Mesh, sharding_rules: ShardingRules | Sequence[ParamRule] | None = None) -> Any:
    """Move a loaded model's params (an LM or a value-head wrapper) into their sharded layout, in place.

    Covers everything the wrapper holds: LM, value head, a policy LoRA adapter (`params["lora"]`)
    and a reward adapter (`reward_params`). Afterwards the model behaves as if it had been
    loaded with `from_pretrained(mesh=...)`. Arrays it shares with a model sharded before (a reference's
    shared layers) become that model's sharded arrays (see `shard_params`). Returns the model.
    """
    inner = getattr(model, "pretrained_model", model)  # the wrapper's LM, or the LM itself
    mesh = auto_mesh(mesh)
    rules = resolve_rules(inner.config.model_type, sharding_rules)
    check_mesh(mesh, rules)
    model.params = shard_params(model.params, mesh, rules)  # a wrapper's LM reads its params from here
    if getattr(model, "reward_params", None) is not None:
        model.reward_params = shard_params(model.reward_params, mesh, rules)
    inner.mesh, inner.sharding_rules = mesh, rules
    return model


def committed(tree: Any, mesh: Mesh | None = None) -> Any:
    """The same arrays, committed to their devices; with a `mesh`, leaves off it (Adam's step count, an RNG
    key restored onto one device) replicated over it.

    jit compiles separately for committed and uncommitted inputs, and its outputs are committed: params fresh
    from `init` (or Adam's step count) would otherwise compile every jitted function twice, once for the first
    step and again for the rest; and one jitted call cannot take a leaf on device 0 beside leaves on the mesh.
    """
    devices = None if mesh is None else set(mesh.devices.flat)

    def commit(x: Any) -> Any:
        if devices is not None and set(x.sharding.device_set) != devices:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return jax.device_put(x, x.sharding)

    return jax.tree_util.tree_map(commit, tree)
