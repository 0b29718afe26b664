"""`create_reference_model`: TRL's frozen reference model, with real memory sharing.

TRL's rule (`trl/models/modeling_base.py`): walk the parameters in `named_parameters()`
order; everything before the first name that contains the layer pattern formatted with
`layer=num_shared_layers` is shared with the policy (and frozen there), the rest is a
frozen copy. In JAX "shared" means the reference holds the very same `jax.Array`
objects as the policy, so the memory is held once; "frozen" means
`policy.trainable_mask` is False there and the reference's forward stops gradients.

Encoder-decoder models: TRL's own pattern for BART-style models
(`model.decoder.layers.{layer}`) counts decoder layers, so everything before decoder
layer N (shared embeddings and the *whole encoder* included) is shared. trlax gives T5
the same meaning with `decoder.block.{layer}`; pass `pattern="encoder.block.{layer}"` to
share only the embeddings and the first N encoder blocks instead.

Donation: a shared leaf must never be donated (that would delete the reference's
array). Train steps donate only the trainable half of `trlax.split_trainable(params,
policy.trainable_mask)` and take the frozen half as a plain argument.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.checkpoint.naming import TensorRule, flatten_paths
from trlax.errors import TrlaxError, TrlaxTypeError
from trlax.inputs import check_not_deleted
from trlax.models.base import FlaxPreTrainedModel
from trlax.value_head import PreTrainedModelWrapper

# TRL's patterns, in TRL's order (unchanged since TRL 0.4.2). Each family's SPEC names the one
# TRL would pick for it (`spec.layer_pattern`; T5's "decoder.block.{layer}" is trlax's own).
LAYER_PATTERNS: tuple[str, ...] = (
    "transformer.h.{layer}",  # GPT-2, GPT-J, GPT-Neo, Bloom
    "model.decoder.layers.{layer}",  # OPT, BART
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",  # Llama, Mistral, Qwen, Gemma
)


def parameter_names(model: FlaxPreTrainedModel) -> list[str]:
    """The LM's HF parameter names in PyTorch's `named_parameters()` order (tied copies once).

    Flax creates params in call order (`model.key_table()` is sorted); PyTorch registers
    them in `__init__` order. trlax families define submodules in `setup()` in the
    PyTorch order, so this walks the module tree in definition order, and falls back to
    creation order inside `@nn.compact` modules (e.g. `kernel` before `bias`). Nothing
    is allocated: the params are abstract.
    """
    return list(parameter_table(model))


def parameter_table(model: FlaxPreTrainedModel) -> dict[str, TensorRule]:
    """`model.key_table()` in PyTorch parameter order (see `parameter_names`), one key per param
    (a stacked expert param, which transformers 5 also holds as one tensor, by its first key)."""
    created: list[tuple[str, ...]] = []

    def init() -> dict[str, Any]:
        params = model.module.init(jax.random.key(0), *model.dummy_inputs())["params"]
        created.extend(path for path, _ in flatten_paths(params))  # creation order, traced once
        return params

    abstract = jax.eval_shape(init)
    table = model.key_table(abstract)
    names: dict[tuple[str, ...], str] = {}
    for key, rule in table.items():  # a stacked expert param is named by its first checkpoint key
        names.setdefault(rule.path, key)
    defined: dict[tuple[str, ...], dict[str, int]] = {}
    _definition_order(model.module.bind({"params": abstract}), (), defined)
    first_seen: dict[tuple[str, ...], int] = {}
    for path in created:
        for i in range(1, len(path) + 1):
            first_seen.setdefault(path[:i], len(first_seen))

    def sort_key(path: tuple[str, ...]) -> list[tuple[int, int]]:
        key = []
        for i, name in enumerate(path):
            ranks = defined.get(path[:i], {})
            key.append((0, ranks[name]) if name in ranks else (1, first_seen[path[: i + 1]]))
        return key

    return {names[path]: table[names[path]] for path in sorted(created, key=sort_key)}


def _definition_order(module: nn.Module, path: tuple[str, ...], out: dict[tuple[str, ...], dict[str, int]]) -> None:
    """Record, per module path, the rank of each child in `setup()` definition order.

    Uses Linen internals (`_try_setup`, `_state.children`: setup-defined submodules and
    params, in assignment order); there is no public API for definition order.
    """
    try:
        module._try_setup()
        children = module._state.children
    except AttributeError as e:  # pragma: no cover - only if Flax changes its internals
        raise RuntimeError(f"cannot read the module definition order from this Flax version: {e}") from None
    out[path] = {name: rank for rank, name in enumerate(children)}
    for name, child in children.items():
        if isinstance(child, nn.Module):
            _definition_order(child, (*path, name), out)


def resolve_layer_pattern(names: list[str], pattern: str | None, default: str) -> str:
    """The layer pattern to use: `pattern` if given (checked against `names`), else the family's `default`."""
    if pattern is None:
        return default
    if "{layer}" not in pattern:
        raise TrlaxError(f"pattern must contain '{{layer}}' (e.g. 'transformer.h.{{layer}}'); got {pattern!r}")
    if not any(pattern.format(layer=0) in name for name in names):
        raise TrlaxError(f"pattern {pattern!r} matches no parameter of this model (TRL would only warn and "
                         f"freeze everything); parameter names look like {names[:3]}")
    return pattern


def count_layers(names: list[str], pattern: str) -> int:
    """How many layers `pattern` matches: the first k with no name containing pattern(layer=k)."""
    count = 0
    while any(pattern.format(layer=count) in name for name in names):
        count += 1
    return count


def shared_parameter_names(names: list[str], num_shared_layers: int, pattern: str) -> list[str]:
    """TRL's order-based rule: every name before the first one containing pattern(layer=N)."""
    target = pattern.format(layer=num_shared_layers)
    first = next(i for i, name in enumerate(names) if target in name)
    return names[:first]


def _copy_tree(tree: Any) -> Any:
    """New buffers for every leaf, same shardings (so donating the source never touches the copy); NumPy leaves
    (params assigned from `flax.serialization`, say) become arrays on the default device."""
    leaves = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
    treedef = jax.tree_util.tree_structure(tree)
    copies = jax.device_put(leaves, [leaf.sharding for leaf in leaves], may_alias=False)
    return jax.tree_util.tree_unflatten(treedef, copies)


def create_reference_model(
    model: PreTrainedModelWrapper, num_shared_layers: int | None = None, pattern: str | None = None
) -> PreTrainedModelWrapper:
    """A frozen reference copy of a value-head model, optionally sharing its first layers.

    - `num_shared_layers=None`: a full copy with its own buffers; the policy is unchanged.
    - `num_shared_layers=N` (0 <= N < number of layers): the params before layer N in
      PyTorch parameter order (embeddings included; see `parameter_names`) are the same
      `jax.Array` objects in both models and become frozen in the policy
      (`model.trainable_mask` False there); the rest (later layers, final norm, untied
      head, value head) are copies.
    - `pattern`: a custom layer pattern such as `"transformer.h.{layer}"`, matched as TRL
      matches it: a substring of the wrapper's parameter names ("pretrained_model." + the
      LM's HF names); by default the family's
      (`spec.layer_pattern`: the first of TRL's `LAYER_PATTERNS` that matches it).

    A LoRA adapter policy (`model.is_peft_model`) gets the base with the adapter off
    instead: the very same base arrays, a copy of the value head, no `num_shared_layers`.

    The reference is a new wrapper of the same class, built explicitly: its own copy of
    the config, the policy's value-head options, `frozen=True` (its forward applies
    `jax.lax.stop_gradient` to its params) and an all-False `trainable_mask`; it shares
    nothing mutable with the policy, only the shared arrays (and no adapters), nor the
    policy's gradient-checkpointing setting (a frozen forward has no backward pass). Raises
    ValueError when a custom pattern matches nothing, or N is negative or not smaller
    than the layer count.
    """
    if not isinstance(model, PreTrainedModelWrapper):
        raise TrlaxTypeError(f"create_reference_model takes a trlax value-head model (PreTrainedModelWrapper); "
                        f"got {type(model).__name__}")
    check_not_deleted(jax.tree_util.tree_leaves(model.params), "the params of the model to copy")
    if model.is_peft_model:  # a LoRA policy: its reference is the base with the adapter off, no copy
        if num_shared_layers is not None or pattern is not None:
            raise TrlaxError("num_shared_layers/pattern do not apply to a LoRA adapter policy: its reference "
                             "already shares the whole frozen base (adapter off); call create_reference_model(model)")
        # The base is frozen in the policy, so sharing it is safe even when a train step
        # donates the trainable params; the value head, which the policy trains, is copied.
        return _frozen_wrapper(model, {"pretrained_model": model.params["pretrained_model"],
                                       "v_head": _copy_tree(model.params["v_head"])})
    shared: set[tuple[str, ...]] = set()
    if num_shared_layers is not None:
        shared = _shared_paths(model.pretrained_model, num_shared_layers, pattern)
    elif pattern is not None:
        raise TrlaxError("pattern is only used with num_shared_layers; pass num_shared_layers=N too")

    # One flat pass: shared leaves are reused as they are, every other leaf is copied.
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.params)
    paths = [tuple(k.key for k in path) for path, _ in flat]
    to_copy = [i for i, path in enumerate(paths) if path not in shared]
    copies = _copy_tree([flat[i][1] for i in to_copy])
    leaves = [leaf for _, leaf in flat]
    for i, leaf_copy in zip(to_copy, copies, strict=True):
        leaves[i] = leaf_copy
    ref_params = jax.tree_util.tree_unflatten(treedef, leaves)

    ref = _frozen_wrapper(model, ref_params)
    if shared:
        model.trainable_mask = jax.tree_util.tree_unflatten(
            treedef, [trainable and path not in shared
                      for path, trainable in zip(paths, jax.tree_util.tree_leaves(model.trainable_mask), strict=True)])
    return ref


def _shared_paths(lm: FlaxPreTrainedModel, num_shared_layers: int, pattern: str | None) -> set[tuple[str, ...]]:
    """Wrapper param paths ("pretrained_model", ...) of the leaves shared under TRL's rule."""
    if isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, numbers.Integral):
        raise TrlaxTypeError(f"num_shared_layers must be an int or None; got {num_shared_layers!r}")
    num_shared_layers = int(num_shared_layers)
    # Matched as TRL matches: against the wrapper's parameter names, so "pretrained_model.transformer.h.{layer}" works.
    table = {f"pretrained_model.{name}": rule for name, rule in parameter_table(lm).items()}
    names = list(table)
    pattern = resolve_layer_pattern(names, pattern, lm.spec.layer_pattern)
    num_layers = count_layers(names, pattern)
    if not 0 <= num_shared_layers < num_layers:
        raise TrlaxError(f"num_shared_layers={num_shared_layers} is out of range: the model has {num_layers} layers "
                         f"matching {pattern!r}, so it must be in [0, {num_layers - 1}] (0 shares only what comes "
                         "before the first layer, e.g. the embeddings); use None for an unshared copy")
    shared = shared_parameter_names(names, num_shared_layers, pattern)
    return {("pretrained_model", *table[name].path) for name in shared}


def _frozen_wrapper(model: PreTrainedModelWrapper, ref_params: dict[str, Any]) -> PreTrainedModelWrapper:
    """A frozen wrapper of the same class over `ref_params`, with its own LM object and config copy."""
    lm = model.pretrained_model
    ref_lm = type(lm)(copy.deepcopy(lm.config), lm.spec, ref_params["pretrained_model"], dtype=lm.dtype,
                      param_dtype=lm.param_dtype)
    ref_lm.mesh, ref_lm.sharding_rules = lm.mesh, lm.sharding_rules
    # What TRL's deepcopy keeps: the checkpoint's generation settings and the dtype saves write.
    ref_lm.storage_dtype, ref_lm.generation_config = lm.storage_dtype, copy.deepcopy(lm.generation_config)
    # and the policy's module as built (a deep copy, as TRL's reference is), not one built from the config as it
    # is now: a field transformers reads at build and the user changed since must not make the two differ
    ref_lm.module = copy.deepcopy(lm.module)
    return type(model)(ref_lm, v_head_params=ref_params["v_head"], frozen=True,
                       base_model_name_or_path=model.base_model_name_or_path, **model.head_options())
