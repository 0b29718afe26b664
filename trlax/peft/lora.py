"""LoRA adapters over trlax models, in PEFT's config and file formats.

PEFT's default `target_modules` for a model type are its family's `SPEC.peft_targets`.

An adapter is a "lora" variable collection that mirrors the base model's param paths:
at each adapted linear layer it holds `{"lora_A": [in, r], "lora_B": [r, out],
"scaling": []}` (float32), and `trlax.models.layers.add_lora` adds
`scaling * (x @ lora_A) @ lora_B` to the layer's output. A call selects an adapter by
passing its tree next to the params (`model.apply(params, ..., lora=tree)`); no tree =
the base model. The base weights are never merged into, or copied for, an adapter.

PEFT's files map one to one: `base_model.model.<module path>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r] are the transposes of `lora_A` / `lora_B` here, and the module
path is the trlax param path, since trlax modules carry the transformers names (where
transformers 5 renames a module in memory, PEFT's name is used at the boundary:
`SPEC.peft_module_names`, e.g. GPT-NeoX's `embed_out` is PEFT's `lm_head`).

`lora_dropout` is applied as PEFT applies it, in training forwards only (`train=True,
dropout_rng=key`): inverted dropout of each adapted layer's input on its LoRA branch
(`dropout(x) @ lora_A`), the base projection seeing x as it is; eval forwards, generation
and reward scoring are deterministic. A model's `apply(..., lora=tree, lora_dropout=rate)`
takes the rate with the tree; a LoRA policy passes its `peft_config["default"].lora_dropout`
(see `trlax.models.layers.add_lora`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trlax.checkpoint.hub import HubOptions, fetch_file, is_hub_id
from trlax.checkpoint.naming import flatten_paths, get_path, set_path
from trlax.checkpoint.reader import CheckpointReader, parse_json_object
from trlax.checkpoint.writer import write_safetensors
from trlax.errors import CheckpointError, TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.models.base import FlaxPreTrainedModel
from trlax.models.layers import LORA_COLLECTION, check_lora_dropout
from trlax.models.registry import spec_for_type

logger = logging.getLogger("trlax")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order of preference
PEFT_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA",)
BASE_LAYER = ".base_layer."  # a PEFT-wrapped layer's own params (weight [out, in], bias [out]), saved in full
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

# PEFT's name for the LM head, which it adapts even when the head is tied to the input embedding, and which
# "all-linear" leaves out.
HEAD_NAME = "lm_head"
ALL_LINEAR = "all-linear"  # matched case-insensitively, as PEFT does

# init_lora_weights values whose adapters fit the unmodified base; the first three can also
# initialise a new adapter ("eva" / "orthogonal" adapters can only be loaded).
_KNOWN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_NEW_INITS = (True, False, "gaussian")

# PEFT LoraConfig fields that are bookkeeping or only shape a fresh init: accepted as they are.
_BOOKKEEPING_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "inference_mode", "megatron_config", "megatron_core", "runtime_config", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "layers_pattern", "qalora_group_size", "ensure_weight_tying",
})


@dataclass
class LoraConfig:
    """trlax's LoRA config; field names and defaults are PEFT's `LoraConfig`'s.

    r: rank (> 0). lora_alpha: scaling = lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora). target_modules: module names (a module matches when its dotted path
    equals the name or ends with "." + name), a regex string matched against the whole
    path, "all-linear", or None for PEFT's default for the model type.
    rank_pattern / alpha_pattern: per-module r / lora_alpha overrides, keyed by a regex
    matched against the end of the module path (PEFT's rule). exclude_modules: like
    target_modules, modules never adapted. modules_to_save: modules trained and saved in
    full (only a reward adapter's `score` head is supported). fan_in_fan_out: PEFT's
    layout flag for merging GPT-2's Conv1D weights; recorded, no effect here (nothing is
    merged). lora_dropout: PEFT's dropout on the LoRA branch's input in training (see the module
    docstring).
    init_lora_weights: True (PEFT's default: lora_A kaiming-uniform, lora_B zeros),
    "gaussian" (lora_A ~ N(0, 1/r), lora_B zeros) or False (both kaiming-uniform, so the
    adapter changes the model from the start; for tests).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None  # the base's revision, which PEFT loads the base at (not the adapter's own)

    def __post_init__(self) -> None:
        for name, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise TrlaxError(f"LoRA {name} must be a positive integer; got {r!r}")
        for name, alpha in [("lora_alpha", self.lora_alpha),
                            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
                raise TrlaxError(f"LoRA {name} must be a finite number (scaling = lora_alpha / r); got {alpha!r}")
        check_lora_dropout(self.lora_dropout)
        if self.bias != "none":
            raise UnsupportedModelError(f"LoRA bias={self.bias!r} (trainable base biases) is not supported by trlax; "
                                        "use bias='none'")
        if self.init_lora_weights not in _KNOWN_INITS:
            # PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA also rewrite the base weights: such an adapter
            # only fits the base PEFT modified, which trlax does not reproduce.
            raise UnsupportedModelError(f"init_lora_weights={self.init_lora_weights!r} is not supported by trlax; "
                                        f"supported: {list(_KNOWN_INITS)}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @classmethod
    def from_peft(cls, config: LoraConfig | Mapping[str, Any] | Any) -> LoraConfig:
        """A LoraConfig from this class, a dict with PEFT's field names (adapter_config.json),
        or a `peft.LoraConfig`. Options that change the math and that trlax does not
        implement (DoRA, LoRA biases, layer selection, other PEFT types, ...) raise
        UnsupportedModelError; PEFT bookkeeping fields are accepted."""
        if isinstance(config, LoraConfig):
            return config
        if not isinstance(config, Mapping):
            if not hasattr(config, "to_dict"):
                raise TrlaxTypeError(f"peft_config must be a trlax.LoraConfig, a dict of PEFT LoraConfig fields or a "
                                f"peft.LoraConfig; got {type(config).__name__}")
            config = config.to_dict()
        config = dict(config)
        peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")) or "LORA").upper()
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise UnsupportedModelError(f"PEFT type {peft_type!r} is not supported by trlax; supported PEFT types: "
                                        f"{list(SUPPORTED_PEFT_TYPES)} (LoRA adapters)")
        if not _left_at_default(config.get("layers_pattern")) and _left_at_default(config.get("layers_to_transform")):
            raise UnsupportedModelError("PEFT LoRA option layers_pattern needs layers_to_transform too (PEFT refuses "
                                        "it alone); remove layers_pattern")
        own = {f.name for f in dataclasses.fields(cls)}
        for name, value in config.items():
            if name in own or name in _BOOKKEEPING_FIELDS or _left_at_default(value):
                continue
            raise UnsupportedModelError(f"PEFT LoRA option {name}={value!r} is not supported by trlax; "
                                        "remove it (or leave it at its default)")
        kwargs = {k: v for k, v in config.items() if k in own and v is not None}
        kwargs["task_type"] = getattr(kwargs.get("task_type"), "value", kwargs.get("task_type"))
        return cls(**kwargs)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json PEFT writes for this config (fields PEFT reads back)."""
        out = dataclasses.asdict(self)
        out.update(peft_type="LORA", inference_mode=True, layers_to_transform=None, layers_pattern=None,
                   use_dora=False, lora_bias=False, layer_replication=None, target_parameters=None)
        return out

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """(r, lora_alpha) for one module, after rank_pattern / alpha_pattern (PEFT's matching)."""
        return (self.rank_pattern.get(_pattern_key(self.rank_pattern, module_path), self.r),
                self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_path), self.lora_alpha))

    def scaling(self, module_path: str) -> float:
        """PEFT's scaling of the module at `module_path`: alpha / r (alpha / sqrt(r) with rsLoRA), after the
        rank and alpha patterns."""
        r, alpha = self.rank_and_alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _left_at_default(value: Any) -> bool:
    """Whether a PEFT option trlax lacks is at its default (None, False or empty); 0 is not (it selects layer 0)."""
    return value is None or value is False or (isinstance(value, (list, tuple, set, dict, str)) and not value)


def _pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _name_matches(names: list[str] | str | None, module_path: str) -> bool:
    """PEFT's module matching: a regex string fullmatches the path; a list entry equals it or ends it."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module_path) is not None
    return module_path in names or any(module_path.endswith(f".{n}") for n in names)


class PeftNames:
    """trlax module paths <-> PEFT's, for one model type (`SPEC.peft_module_names`; equal for most families).

    A rename applies to its module and everything under it ("embed_out" <-> "lm_head", and keys below them).
    """

    def __init__(self, model_type: str) -> None:
        try:
            self.renames = dict(spec_for_type(model_type).peft_module_names)
        except UnsupportedModelError:  # a type trlax does not know has nothing to rename
            self.renames = {}

    @staticmethod
    def _swap(name: str, table: Mapping[str, str]) -> str:
        for old, new in table.items():
            if name == old or name.startswith(f"{old}."):
                return new + name[len(old):]
        return name

    def to_peft(self, path: str) -> str:
        return self._swap(path, self.renames)

    def to_trlax(self, name: str) -> str:
        return self._swap(name, {new: old for old, new in self.renames.items()})


def fused_targets(targets: list[str] | str, model_type: str, module_paths: Iterable[str]) -> list[str]:
    """The target_modules names PEFT turns into target_parameters on fused MoE experts (or the router) of this
    model type (`SPEC.peft_fused_targets`; transformers 5 fused them). "all-linear" includes them all; a regex
    names those it matches under any module, as PEFT probes the unfused names."""
    try:
        fused = spec_for_type(model_type).peft_fused_targets
    except UnsupportedModelError:
        return []
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return list(fused)
    if isinstance(targets, str):
        return [f for f in fused if any(re.fullmatch(targets, f"{m}.{f}") for m in module_paths)]
    return [f for f in fused if any(t == f or t.endswith(f".{f}") for t in targets)]


# --- targets ---------------------------------------------------------------------------------
def linear_modules(base_params: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Dotted path -> (in, out) of every linear layer (a 2-D `kernel` [in, out]) of a param tree."""
    return {".".join(path[:-1]): (int(leaf.shape[0]), int(leaf.shape[1]))
            for path, leaf in flatten_paths(base_params) if path[-1] == "kernel" and len(leaf.shape) == 2}


def _all_modules(base_params: Mapping[str, Any]) -> set[str]:
    return {".".join(path[:i]) for path, _ in flatten_paths(base_params) for i in range(1, len(path))}


def resolve_targets(config: LoraConfig, base_params: Mapping[str, Any], model_type: str) -> dict[str, tuple[int, int]]:
    """Dotted path -> (in, out) of the linear layers this config adapts in the base model.

    Raises UnsupportedModelError when the targets match nothing, or match a module that
    is not a linear layer (an embedding, a norm, a whole block).
    """
    linear = linear_modules(base_params)
    names = PeftNames(model_type)
    targets = config.target_modules
    if targets is None:
        try:
            targets = list(spec_for_type(model_type).peft_targets)
        except UnsupportedModelError:
            targets = []
        if not targets:  # PEFT has no default for the type (or trlax does not know it): PEFT refuses too
            raise UnsupportedModelError(f"LoRA target_modules=None has no PEFT default for model_type {model_type!r}; "
                                        "name the modules, e.g. target_modules=['q_proj', 'v_proj']")
    modules = _all_modules(base_params)
    known = _short_names(map(names.to_peft, linear))  # for the messages: the linear layers' PEFT names
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        candidates = [p for p in linear if names.to_peft(p).split(".")[-1] != HEAD_NAME]
    else:
        candidates = [p for p in modules if _name_matches(targets, names.to_peft(p))]
    # PEFT never adapts excluded modules, nor modules saved in full (modules_to_save).
    saved = config.modules_to_save or []
    chosen = sorted(p for p in candidates if not _name_matches(config.exclude_modules, names.to_peft(p))
                    and not any(re.match(rf"(^|.*\.){m}($|\..*)", names.to_peft(p)) for m in saved))
    names_head = HEAD_NAME in targets if isinstance(targets, list) else (
        targets.lower() != ALL_LINEAR and re.fullmatch(targets, HEAD_NAME) is not None)  # a regex: PEFT's fullmatch
    names_head = names_head and not _name_matches(config.exclude_modules, HEAD_NAME) and HEAD_NAME not in saved
    if names_head and not any(_name_matches([HEAD_NAME], names.to_peft(p)) for p in linear):
        raise UnsupportedModelError(
            f"LoRA target {HEAD_NAME!r} is no linear layer of this {model_type} model: its LM head is tied to the "
            "input embedding (or has another name), and trlax applies LoRA to linear layers only, where PEFT "
            f"would adapt a tied head too; leave {HEAD_NAME!r} out of target_modules (this model's linear layers: "
            f"{known})")
    not_linear = [p for p in chosen if p not in linear]
    if not_linear:
        raise UnsupportedModelError(
            f"LoRA target_modules={targets!r} match {not_linear[:4]}, which are not linear layers; trlax applies "
            f"LoRA to linear layers only (this {model_type} model's: {known})")
    if not chosen:
        raise UnsupportedModelError(
            f"LoRA target_modules={targets!r} match no module of this {model_type} model; its linear layers are "
            f"named {known} (PEFT names, e.g. {sorted(map(names.to_peft, linear))[:1]})")
    fused = fused_targets(targets, model_type, modules)
    if isinstance(targets, str) and targets.lower() != ALL_LINEAR and fused_targets(ALL_LINEAR, model_type, ()):
        raise UnsupportedModelError(
            f"LoRA target_modules={targets!r}: on a {model_type} model PEFT (with transformers 5) rewrites a regex "
            "into the bare module names it matches and adapts those in every layer, which trlax does not copy; name "
            f"the modules in a list instead (this model's linear layers: {[n for n in known if n not in fused]})")
    if fused:
        raise UnsupportedModelError(
            f"LoRA target_modules={targets!r} name {fused} of this {model_type} model, which PEFT (with transformers "
            "5) adapts as target_parameters of the fused experts or the router, not as linear layers; trlax cannot "
            f"adapt those: drop {fused} (this model's other linear layers: "
            f"{[n for n in known if n not in fused]})")
    if isinstance(targets, list):
        # (a name matching only excluded modules is used: PEFT says nothing of it either)
        unused = [n for n in targets if not any(_name_matches([n], names.to_peft(p)) for p in candidates)]
        if unused:
            logger.warning("LoRA target_modules %s match no linear layer of this %s model (ignored, as PEFT does)",
                           unused, model_type)
    return {p: linear[p] for p in chosen}


def _short_names(paths: Iterable[str]) -> list[str]:
    return sorted({p.split(".")[-1] for p in paths})


# --- params ----------------------------------------------------------------------------------
def init_lora(config: LoraConfig, base_params: Mapping[str, Any], model_type: str, rng: jax.Array) -> dict[str, Any]:
    """A fresh adapter tree, initialised as PEFT does: lora_A [in, r] kaiming-uniform
    (= U(+-1/sqrt(in)), torch's Linear default) or N(0, 1/r) for "gaussian"; lora_B [r, out]
    zeros, so the adapted model starts equal to the base (with init_lora_weights=False,
    lora_B is U(+-1/sqrt(r)) too). All float32."""
    if config.init_lora_weights not in _NEW_INITS:
        raise UnsupportedModelError(f"init_lora_weights={config.init_lora_weights!r} cannot initialise a new "
                                    f"adapter in trlax; use one of {list(_NEW_INITS)}")
    # Drawn with numpy from the key's bits: a jax.random draw compiles once per shape, which
    # costs seconds per distinct layer shape; the draws here need no device program at all.
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
    tree: dict[str, Any] = {}
    names = PeftNames(model_type)
    for path, (fan_in, fan_out) in sorted(resolve_targets(config, base_params, model_type).items()):
        r, _ = config.rank_and_alpha(names.to_peft(path))
        if config.init_lora_weights == "gaussian":
            a = gen.normal(0.0, 1.0 / r, (fan_in, r))
        else:  # kaiming_uniform(a=sqrt(5)) on the [r, in] torch weight = U(+-1/sqrt(in))
            a = gen.uniform(-(fan_in**-0.5), fan_in**-0.5, (fan_in, r))
        if config.init_lora_weights is False:
            b = gen.uniform(-(r**-0.5), r**-0.5, (r, fan_out))
        else:
            b = np.zeros((r, fan_out))
        leaves = {"lora_A": a, "lora_B": b, "scaling": np.asarray(config.scaling(names.to_peft(path)))}
        set_path(tree, tuple(path.split(".")), {k: jnp.asarray(v, jnp.float32) for k, v in leaves.items()})
    return tree


def lora_modules(lora: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted module path -> its {"lora_A", "lora_B", "scaling"} leaves."""
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in flatten_paths(lora):
        out.setdefault(".".join(path[:-1]), {})[path[-1]] = leaf
    return out


def trainable_lora_mask(lora: Mapping[str, Any], trainable: bool = True) -> dict[str, Any]:
    """Bools over an adapter tree: lora_A / lora_B follow `trainable`; `scaling` is a constant, never trained."""
    mask: dict[str, Any] = {}
    for path, _ in flatten_paths(lora):
        set_path(mask, path, trainable and path[-1] != "scaling")
    return mask


def check_applied(model: FlaxPreTrainedModel, lora: Mapping[str, Any]) -> None:
    """Raise if some adapted layer's forward never reads its adapter.

    A family file that still builds a projection with `flax.linen.Dense` (not the
    LoRA-aware `layers.Dense`) would otherwise ignore the adapter silently. The check
    traces the forward abstractly (no compute) and finds `lora_A` inputs the program
    never uses.
    """
    variables = {"params": model.abstract_params(), LORA_COLLECTION: lora}

    def forward(v: dict[str, Any]) -> Any:
        return model.apply(v["params"], *model.dummy_inputs(), lora=v[LORA_COLLECTION])

    closed = jax.make_jaxpr(forward)(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                            variables))
    jaxpr = closed.jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    unused = [".".join(str(getattr(k, "key", k)) for k in path[1:-1])
              for (path, _), var in zip(leaves, jaxpr.invars, strict=True)
              if path[0].key == LORA_COLLECTION and path[-1].key == "lora_A" and id(var) not in used]
    if unused:
        raise UnsupportedModelError(
            f"{model.config.model_type}: the layers {unused[:4]} do not apply LoRA adapters in trlax (their module "
            "does not use trlax.models.layers.Dense); leave them out of target_modules")


# --- PEFT files ------------------------------------------------------------------------------
@dataclass
class AdapterFiles:
    """A PEFT adapter as read from disk: its config and every tensor under PEFT's key names."""

    source: str
    config: LoraConfig
    tensors: dict[str, np.ndarray]


def is_adapter_folder(source: str | os.PathLike, options: HubOptions) -> bool:
    """True when `source` (folder or hub id) holds a PEFT adapter_config.json rather than a full model."""
    local = Path(source)
    if local.is_dir():
        return (local / ADAPTER_CONFIG_NAME).is_file()
    if not is_hub_id(source):
        return False
    try:
        return fetch_file(source, ADAPTER_CONFIG_NAME, options) is not None
    except CheckpointError:  # unreachable repo: let the regular loader say why
        return False


def read_adapter(source: str | Path, options: HubOptions | None = None) -> AdapterFiles:
    """Read adapter_config.json and adapter_model.safetensors (or .bin, needs torch) from a folder or hub id."""
    options = options or HubOptions()
    config_path = fetch_file(source, ADAPTER_CONFIG_NAME, options)
    if config_path is None:
        raise CheckpointError(f"no {ADAPTER_CONFIG_NAME} in {source!s}: a PEFT adapter folder holds "
                              f"{ADAPTER_CONFIG_NAME} and one of {list(ADAPTER_WEIGHTS_NAMES)}")
    raw = parse_json_object(Path(config_path).read_bytes(), str(config_path))
    config = LoraConfig.from_peft(raw)
    for name in ADAPTER_WEIGHTS_NAMES:
        path = fetch_file(source, name, options)
        if path is not None:
            with CheckpointReader([Path(path)]) as reader:
                tensors = {k: np.asarray(v) for k, v in reader.items()}
            return AdapterFiles(str(source), config, tensors)
    raise CheckpointError(f"adapter {source!s} has no weights: expected one of {list(ADAPTER_WEIGHTS_NAMES)}")


def _copies_base_layer(stored: np.ndarray, module: str, name: str, base_params: Mapping[str, Any]) -> bool:
    """Whether a full tensor (torch layout) equals the base's `module` weight or bias, compared in the base's
    dtype; a tied LM head (no `module` in the base) equals the input embedding it is tied to."""
    leaves = {"weight": (("embedding", False), ("kernel", True)), "bias": (("bias", False),)}.get(name, ())
    bases = []
    for leaf, transposed in leaves:
        try:
            base = np.asarray(get_path(base_params, (*module.split("."), leaf)))
        except KeyError:
            continue
        bases.append(base.T if transposed else base)
    if not bases and name == "weight":  # a tied head: the embedding tables are its candidates
        bases = [np.asarray(leaf) for path, leaf in flatten_paths(base_params) if path[-1] == "embedding"]
    return any(base.shape == stored.shape and np.array_equal(np.asarray(stored).astype(base.dtype), base)
               for base in bases)


def lora_from_peft(files: AdapterFiles, base_params: Mapping[str, Any], model_type: str, *,
                   base_name: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter tree, the other tensors keyed by module path + leaf, e.g. "score.weight").

    Checks the adapter against the base strictly: every module the config targets must
    have its lora_A [r, in] / lora_B [out, r] with the base's in/out, and no LoRA tensor
    may name anything else; a mismatch raises CheckpointError naming the adapter's
    `base_model_name_or_path` and the base.
    """
    config = files.config
    trained_on = config.base_model_name_or_path
    fit = (f"adapter {files.source} (trained on base {trained_on!r}) does not fit the base model "
           f"{base_name!r} ({model_type})")
    if trained_on and base_name and trained_on != base_name:
        logger.warning("adapter %s was trained on base %r; applying it to %r (shapes are checked)",
                       files.source, trained_on, base_name)
    names = PeftNames(model_type)
    found: dict[str, dict[str, np.ndarray]] = {}  # by trlax module path
    rest: dict[str, np.ndarray] = {}
    for key, array in files.tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(names.to_trlax(match["module"]), {})[match["ab"]] = array
        elif key.startswith(PEFT_PREFIX) and ".lora_" not in key:
            rest[names.to_trlax(key[len(PEFT_PREFIX):])] = array
        else:
            raise UnsupportedModelError(f"adapter {files.source} holds {key!r}, which is not a LoRA A/B weight or a "
                                        "saved module; trlax supports plain LoRA adapters (no DoRA, biases, "
                                        "embedding LoRA)")
    linear = linear_modules(base_params)
    strangers = sorted(set(found) - set(linear))
    if strangers:
        raise CheckpointError(f"{fit}: it adapts {[names.to_peft(p) for p in strangers[:4]]}, which the base has no "
                              "linear layer for")
    for key in [k for k in rest if BASE_LAYER in k and k.split(BASE_LAYER)[0] in found]:
        # PEFT saves the base weight (and bias: GPT-J's, Phi's head) of an adapted lm_head / embedding too
        # (save_embedding_layers): a copy of the base's layer is nothing to load; a changed one (a resized or
        # retrained head) is refused.
        module, name = key.split(BASE_LAYER)
        leaf = {"weight": "kernel", "bias": "bias"}.get(name)
        try:
            base = None if leaf is None else np.asarray(get_path(base_params, (*module.split("."), leaf)), np.float32)
        except KeyError:
            base = None
        stored = np.asarray(rest[key], np.float32)
        if base is None or not np.array_equal(stored.T if leaf == "kernel" else stored, base):
            raise CheckpointError(f"{fit}: it saves {key!r}, which differs from the base's layer (a resized or "
                                  "retrained layer); trlax loads LoRA adapters over an unchanged base")
        del rest[key]
    for key in [k for k in rest if BASE_LAYER not in k]:
        # save_embedding_layers=True: PEFT saves the input embedding and LM head (and its bias) in full even when
        # it adapts neither; a copy of the base's layer is nothing to load (a changed one stays, and is refused).
        module, name = key.rsplit(".", 1)
        if not _name_matches(config.modules_to_save, module) and _copies_base_layer(rest[key], module, name,
                                                                                     base_params):
            del rest[key]
    try:
        targets = resolve_targets(config, base_params, model_type)
    except UnsupportedModelError as e:
        raise CheckpointError(f"{fit}: {e}") from None
    if set(found) != set(targets):
        missing, extra = sorted(set(targets) - set(found)), sorted(set(found) - set(targets))
        raise CheckpointError(f"{fit}: its config targets {len(targets)} layers but its weights hold "
                              f"{len(found)} (missing {missing[:4]}, not targeted {extra[:4]})")
    tree: dict[str, Any] = {}
    for path, (fan_in, fan_out) in sorted(targets.items()):
        r, _ = config.rank_and_alpha(names.to_peft(path))
        pair = found[path]
        want = {"A": (r, fan_in), "B": (fan_out, r)}
        for ab in "AB":
            got = tuple(pair[ab].shape) if ab in pair else None
            if got != want[ab]:
                raise CheckpointError(f"{fit}: {PEFT_PREFIX}{names.to_peft(path)}.lora_{ab}.weight has shape {got}, "
                                      "the base's "
                                      f"layer ({fan_in} -> {fan_out}, r={r}) needs {want[ab]}")
        set_path(tree, tuple(path.split(".")), {
            "lora_A": jnp.asarray(pair["A"].T, jnp.float32), "lora_B": jnp.asarray(pair["B"].T, jnp.float32),
            "scaling": jnp.asarray(config.scaling(names.to_peft(path)), jnp.float32)})
    return tree, rest


def peft_state_dict(lora: Mapping[str, Any], model_type: str) -> dict[str, np.ndarray]:
    """PEFT's adapter_model keys for an adapter tree: lora_A.weight [r, in], lora_B.weight [out, r], float32."""
    names = PeftNames(model_type)
    state: dict[str, np.ndarray] = {}
    for path, leaves in sorted(lora_modules(lora).items()):
        for ab in "AB":
            weight = np.asarray(jax.device_get(leaves[f"lora_{ab}"]), np.float32).T
            state[f"{PEFT_PREFIX}{names.to_peft(path)}.lora_{ab}.weight"] = np.ascontiguousarray(weight)
    return state


def check_scalings(config: LoraConfig, lora: Mapping[str, Any], model_type: str) -> None:
    """TrlaxError when an adapter's `scaling` leaves are no longer the config's (lora_alpha / r): PEFT's files
    store lora_alpha only, so a save would lose the change. Run before anything is written."""
    names = PeftNames(model_type)
    changed = [path for path, leaves in sorted(lora_modules(lora).items()) if not np.isclose(
        np.asarray(jax.device_get(leaves["scaling"]), np.float64), config.scaling(names.to_peft(path)), rtol=1e-6)]
    if changed:
        raise TrlaxError(f"the LoRA scaling of {len(changed)} module(s), e.g. {changed[0]}, is no longer lora_alpha "
                         "/ r (an optimizer over all of params['lora'] changed it, weight decay say); PEFT's adapter "
                         "stores lora_alpha only, so the change would be lost: train with the model's "
                         "trainable_mask (trlax.masked_optimizer or split_trainable), which keeps the scalings")


def write_adapter_files(folder: Path, config: LoraConfig, lora: Mapping[str, Any], *, model_type: str,
                        base_name: str | None, task_type: str, keeps_layout: bool,
                        extra_tensors: Mapping[str, np.ndarray] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder` (PEFT's layout).

    keeps_layout: the adapted layers store weights [in, out] (GPT-2's Conv1D), which PEFT
    records as fan_in_fan_out=True. extra_tensors: modules saved in full, under PEFT's keys
    (`base_model.model.score.weight`).
    """
    peft_config = config.to_peft_dict()
    peft_config.update(base_model_name_or_path=base_name, task_type=task_type,
                       fan_in_fan_out=bool(keeps_layout or config.fan_in_fan_out))
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    tensors = {**peft_state_dict(lora, model_type), **(extra_tensors or {})}
    write_safetensors(folder / ADAPTER_WEIGHTS_NAMES[0], tensors, {"format": "pt"})


def get_module(tree: Mapping[str, Any], module_path: str) -> Any:
    """The subtree of `tree` at a dotted module path ("transformer.h.0.attn.c_attn"); KeyError if absent."""
    return get_path(tree, tuple(module_path.split(".")))
