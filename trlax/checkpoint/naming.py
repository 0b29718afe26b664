"""HF (PyTorch) tensor names <-> trlax param paths, by a few generic rules.

Flax submodules carry the PyTorch names, so a param path `("transformer", "h", "0",
"attn", "c_attn", "kernel")` is the state-dict key `transformer.h.0.attn.c_attn.weight`.
The leaf name decides the rest: `kernel` is the transpose of torch's Linear `weight`
(unless the family keeps the layout, like GPT-2's Conv1D), `embedding` and `scale` are
`weight` as is, `bias` is `bias` (and `weight` is `weight`). Running the rules backwards
gives the save path.

Mixture-of-experts weights are the one exception: trlax keeps each layer's experts as one
stacked param [E, in, out] (as transformers 5 does in memory), while checkpoints store
every expert's Linear weight separately (`...experts.{e}.w1.weight`, as transformers
writes them). A family lists these params in its SPEC (`stacked_weights`); each HF tensor
then maps to a slice of its param (`TensorRule.index`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trlax.errors import CheckpointError

# `weight`: a param kept in torch's layout that is not a linear layer (an MoE router).
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}

# (regex on a param's dotted path, HF key templates): a param [E, in, out] stored in checkpoints
# as E x len(templates) Linear weights [out / len(templates), in]. Templates are `re` expansions
# of the match with `{e}` for the expert, e.g. (r"^(.*)\.experts\.gate_up_proj$",
# (r"\1.experts.{e}.w1.weight", r"\1.experts.{e}.w3.weight")): the out dim is the templates'
# parts concatenated in order.
StackedWeight = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class TensorRule:
    """Where one HF tensor goes: its param path, whether to transpose, the param's shape."""

    path: tuple[str, ...]
    transpose: bool
    shape: tuple[int, ...]  # the trlax (Flax) shape of this tensor (of its slice, for a stacked param)
    dtype: Any  # the param's dtype in trlax
    index: tuple[int | slice, ...] = ()  # a stacked param: this tensor is param[index] (see StackedWeight)
    param_shape: tuple[int, ...] = ()  # a stacked param: the whole param's shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """The checkpoint tensor in trlax's layout (the slice `index` of a stacked param)."""
        return array.T if self.transpose else array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """This key's checkpoint tensor from the whole param `array`."""
        array = array[self.index] if self.index else array
        return np.ascontiguousarray(array.T) if self.transpose else array


def flatten_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a nested dict, in insertion order."""
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_paths(value, (*prefix, name))
        else:
            yield (*prefix, name), value


def hf_key(path: tuple[str, ...], prefix: str = "") -> str:
    """The state-dict key of a param path: ("a", "b", "kernel") -> "a.b.weight"."""
    leaf = path[-1]
    if leaf not in _LEAF_TO_HF:
        raise CheckpointError(f"param {'.'.join(path)!r} has no HF name rule (leaf {leaf!r})")
    return prefix + ".".join((*path[:-1], _LEAF_TO_HF[leaf]))


def _stacked_rules(path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, match: re.Match[str],
                   templates: tuple[str, ...], prefix: str) -> dict[str, TensorRule]:
    """The per-expert HF keys of a stacked param [E, in, out], expert by expert, parts in order."""
    if len(shape) != 3 or shape[2] % len(templates):
        raise CheckpointError(f"stacked param {'.'.join(path)!r} of shape {shape} is not [experts, in, "
                              f"{len(templates)} x out]")
    num, fan_in, width = shape[0], shape[1], shape[2] // len(templates)
    return {prefix + match.expand(template).format(e=e): TensorRule(
                path, True, (fan_in, width), dtype, (e, slice(None), slice(j * width, (j + 1) * width)), shape)
            for e in range(num) for j, template in enumerate(templates)}


def key_table(
    abstract_params: Mapping[str, Any],
    *,
    prefix: str = "",
    path_prefix: tuple[str, ...] = (),
    keep_layout: Iterable[str] = (),
    stacked: Iterable[StackedWeight] = (),
) -> dict[str, TensorRule]:
    """HF key -> TensorRule for every leaf of an (abstract) param tree.

    `abstract_params` holds arrays or ShapeDtypeStructs; `prefix` is prepended to every
    key (TRL's "v_head."), `path_prefix` to every param path (the wrapper's
    "pretrained_model"); `keep_layout` regexes name 2-D weights stored untransposed;
    `stacked` names the expert params stored one Linear weight per expert (see `StackedWeight`).
    """
    keep = [re.compile(p) for p in keep_layout]
    stacked_res = [(re.compile(p), templates) for p, templates in stacked]
    table: dict[str, TensorRule] = {}
    for path, leaf in flatten_paths(abstract_params):
        dotted = ".".join(path)
        found = next(((m, t) for r, t in stacked_res if (m := r.match(dotted))), None)
        if found is not None:
            table.update(_stacked_rules((*path_prefix, *path), tuple(leaf.shape), leaf.dtype, *found, prefix))
            continue
        key = hf_key(path, prefix)
        transpose = path[-1] == "kernel" and len(leaf.shape) == 2 and not any(k.match(key) for k in keep)
        table[key] = TensorRule((*path_prefix, *path), transpose, tuple(leaf.shape), leaf.dtype)
    return table


def hf_tensors(table: Mapping[str, TensorRule], params: Mapping[str, Any],
               fetch: Callable[[Any], np.ndarray] = np.asarray) -> Iterable[tuple[str, np.ndarray]]:
    """(HF key, checkpoint tensor) for every key of `table`, read from `params`.

    Each param is fetched to the host (`fetch`) once, even when it holds many keys (stacked experts).
    """
    last: tuple[tuple[str, ...], np.ndarray] | None = None
    for key, rule in table.items():
        if last is None or last[0] != rule.path:
            last = (rule.path, fetch(get_path(params, rule.path)))
        yield key, rule.to_hf(last[1])


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Puts `value` at `path` in the nested dict `tree`, making the dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path` in the nested mapping `tree`; KeyError if absent."""
    for name in path:
        tree = tree[name]
    return tree
