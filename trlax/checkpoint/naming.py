"""HF (PyTorch) tensor names <-> trlax param paths, by a few generic rules.

Flax submodules carry the PyTorch names, so a param path `("transformer", "h", "0",
"attn", "c_attn", "kernel")` is the state-dict key `transformer.h.0.attn.c_attn.weight`.
The leaf name decides the rest: `kernel` is the transpose of torch's Linear `weight`
(unless the family keeps the layout, like GPT-2's Conv1D), `embedding` and `scale` are
`weight` as is, `bias` is `bias`. Running the rules backwards gives the save path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trlax.errors import CheckpointError

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclass(frozen=True)
class TensorRule:
    """Where one HF tensor goes: its param path, whether to transpose, the param's shape."""

    path: tuple[str, ...]
    transpose: bool
    shape: tuple[int, ...]  # the trlax (Flax) shape
    dtype: Any  # the param's dtype in trlax

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transpose else array

    def to_hf(self, array: np.ndarray) -> np.ndarray:
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


def key_table(
    abstract_params: Mapping[str, Any],
    *,
    prefix: str = "",
    path_prefix: tuple[str, ...] = (),
    keep_layout: Iterable[str] = (),
) -> dict[str, TensorRule]:
    """HF key -> TensorRule for every leaf of an (abstract) param tree.

    `abstract_params` holds arrays or ShapeDtypeStructs; `prefix` is prepended to every
    key (TRL's "v_head."), `path_prefix` to every param path (the wrapper's
    "pretrained_model"); `keep_layout` regexes name 2-D weights stored untransposed.
    """
    keep = [re.compile(p) for p in keep_layout]
    table: dict[str, TensorRule] = {}
    for path, leaf in flatten_paths(abstract_params):
        key = hf_key(path, prefix)
        transpose = path[-1] == "kernel" and len(leaf.shape) == 2 and not any(k.match(key) for k in keep)
        table[key] = TensorRule((*path_prefix, *path), transpose, tuple(leaf.shape), leaf.dtype)
    return table


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree
