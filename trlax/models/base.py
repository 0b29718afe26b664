"""The model object: a Linen module, its transformers config and its params.

Loading from a folder, a hub id or a PyTorch model starts here (`from_pretrained`); the
transformers checkpoint I/O itself (key tables, state dicts, saving, PyTorch both ways)
is `trlax.checkpoint.model_io.CheckpointMixin`, which this class inherits.

Like transformers' old Flax API, every call takes `params=` (default: `self.params`) and
is jit-compiled once per input shape; the module itself is pure. transformers'
`gradient_checkpointing_enable()` / `eval()` / `train()` exist for ported code: the first
rematerialises each block in the backward pass, `eval()` changes nothing (dropout is the
per-call `train=True, dropout_rng=key`).

Params have one home. A standalone model holds its own; the LM inside a value-head
wrapper (`wrapper.pretrained_model`) is a view that reads and writes
`wrapper.params["pretrained_model"]` (and uses the wrapper's LoRA policy adapter, if
any, with its `lora_dropout`), so assigning the wrapper's params is seen by the LM's
forward and generation too.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh

from trlax.checkpoint.dtypes import is_float
from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.loading import Placer
from trlax.checkpoint.loading_args import translate_loading_args
from trlax.checkpoint.model_io import CheckpointMixin
from trlax.checkpoint.naming import flatten_paths
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.torch_models import is_torch_model
from trlax.errors import CheckpointError, TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.generation import GenerateOutput, GenerationCache, generate
from trlax.generation_config import inferred_attention_mask, read_generation_config, resolve_generation
from trlax.inputs import (
    ParamsCheck,
    check_dropout_rng,
    check_not_deleted,
    check_positions,
    check_shape,
    check_token_range,
    token_ids,
    with_live_params,
)
from trlax.models.cache import KVCache, extended_cache, past_kv_cache, past_kv_length
from trlax.models.layers import LORA_COLLECTION, check_lora_dropout, drop_lora_inputs
from trlax.models.registry import get_spec, supported_model_types
from trlax.models.spec import ArchitectureSpec, ParamRule
from trlax.models.stack import remat_blocks
from trlax.sharding import ShardingRules, activation_sharding, auto_mesh, check_mesh, make_placer, resolve_rules

# The float dtypes a model computes in and holds its params in (float64 too under jax_enable_x64).
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def load_config(folder: Path, source: str) -> transformers.PretrainedConfig:
    """Read config.json with transformers' AutoConfig; unknown model types and unreadable files fail clearly."""
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"cannot read the config of {source}: {e}. trlax supports model_type in {supported_model_types()}"
        ) from None
    except Exception as e:  # noqa: BLE001 - invalid JSON (OSError), a field of the wrong type (hub's validation)
        reason = " ".join(str(e).split()).rstrip(".")
        raise CheckpointError(f"the config.json of {source} is not a valid transformers config ({reason}); "
                              "fix or replace the file") from None


# Abstract param trees (ShapeDtypeStructs) by (module class, config JSON, dtype, param dtype): see
# `FlaxPreTrainedModel.abstract_params`. A few dozen architectures at most stay in a process.
ABSTRACT_PARAMS: dict[tuple[Any, ...], dict[str, Any]] = {}
ABSTRACT_PARAMS_KEPT = 32


def jit_forward(apply: Callable[..., Any], static_argnames: tuple[str, ...], trace_settings: Callable[[], Hashable],
                what: str) -> Callable[..., Any]:
    """`apply(params, ...)` jitted (`static_argnames` static) behind `with_live_params`.

    `trace_settings()` (the caller's settings that `apply` reads at trace time: gradient checkpointing and the
    config fields transformers reads per call, e.g. a mixture of experts' `output_router_logits`) is read at
    every call and keys jit's cache, so a program traced under one setting is never reused under another.
    """
    def keyed(params: dict[str, Any], *args: Any, trace_settings: Hashable, **kwargs: Any) -> Any:
        return apply(params, *args, **kwargs)  # trace_settings only keys jit's cache

    jitted = jax.jit(keyed, static_argnames=(*static_argnames, "trace_settings"))
    return with_live_params(
        lambda params, *args, **kwargs: jitted(params, *args, trace_settings=trace_settings(), **kwargs), what)


class RebuildsCompiled:
    """An object whose jitted functions (the attributes named in `compiled_attributes`, made by `build_compiled`)
    are bound to it: `copy.copy`, `copy.deepcopy` and pickle copy everything else and build the copy's own, as torch's
    deepcopy and pickle of a module give an independent model (a copied jitted function would run the original's
    module and config, and none pickles)."""

    compiled_attributes: ClassVar[tuple[str, ...]] = ()

    def build_compiled(self) -> None:
        raise NotImplementedError

    def copied_state(self, memo: dict[int, Any] | None = None) -> dict[str, Any]:
        """The attributes a copy takes (deep-copied with deepcopy's `memo`, as they are for pickle without one);
        DeletedParamsError when `params` hold arrays a donating step deleted."""
        state = {k: v for k, v in vars(self).items() if k not in self.compiled_attributes}
        check_not_deleted(jax.tree_util.tree_leaves(state), f"the params of the {type(self).__name__} being copied")
        return state if memo is None else copy.deepcopy(state, memo)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(self.copied_state(memo))
        return copied

    def __copy__(self) -> Any:
        copied = type(self).__new__(type(self))
        copied.__setstate__(self.copied_state())
        return copied

    def __getstate__(self) -> dict[str, Any]:
        if getattr(self, "mesh", None) is not None:
            raise TrlaxError(f"a {type(self).__name__} placed on a mesh does not pickle (its devices do not): save it "
                             "with save_pretrained and load it with from_pretrained(..., mesh=...) in the other "
                             "process, or pickle it before sharding")
        return self.copied_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.build_compiled()


def refuse_train_mode(mode: bool) -> None:
    """transformers' `train(True)` has no trlax counterpart: modules hold no mode, dropout is per call."""
    if mode:
        raise TrlaxTypeError("trlax models have no train mode: dropout is chosen per call, with "
                             "model(..., train=True, dropout_rng=key) or apply(params, ..., train=True, "
                             "dropout_rng=key) in a train step; calls without it run in eval mode, so eval() and "
                             "train(False) change nothing")


def kv_cache_argument(cache: Any, past_key_values: Any) -> Any:
    """The KV cache a forward continues: `cache` (transformers 5.25's keyword) or `past_key_values` (TRL's and
    earlier transformers'); None without either; TrlaxTypeError with both."""
    if cache is not None and past_key_values is not None:
        raise TrlaxTypeError("pass the KV cache once: cache= (transformers' name) or past_key_values= (TRL's)")
    return cache if past_key_values is None else past_key_values


class FlaxPreTrainedModel(RebuildsCompiled, CheckpointMixin):
    """A trlax model: `module` (Linen), `config` (transformers), `params` (plain dict).

    `FlaxPreTrainedModel(config)` is a model without params (enough for names, shapes and
    `abstract_params`); `from_config` initialises params, `from_pretrained` loads them.
    """

    is_encoder_decoder: ClassVar[bool] = False
    can_generate: ClassVar[bool] = True  # an LM head: `generate`, and a generation_config read at load
    # `from_pretrained` keywords that go on to the constructor (a subclass's own arguments).
    constructor_arguments: ClassVar[tuple[str, ...]] = ()
    # `apply` arguments the jitted forward compiles a program per value of.
    static_forward_arguments: ClassVar[tuple[str, ...]] = ("train", "output_hidden_states", "lora_dropout")
    compiled_attributes: ClassVar[tuple[str, ...]] = ("check_params", "generation_cache", "_forward")

    def __init__(
        self,
        config: transformers.PretrainedConfig,
        spec: ArchitectureSpec | None = None,
        params: dict[str, Any] | None = None,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
    ) -> None:
        spec = spec or get_spec(config.model_type, encoder_decoder=self.is_encoder_decoder)
        spec.validate(config)
        for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
            shown = getattr(value, "__name__", str(value))  # a scalar type's name, a dtype's or a string
            if not is_float(value):
                raise UnsupportedModelError(f"{name}={shown} is not a floating-point dtype; trlax models compute "
                                            "and hold params in one: use float32, bfloat16 or float16")
            wide = np.dtype(value) == np.float64 and jax.config.jax_enable_x64  # float64 is float32 without x64
            if np.dtype(value).name not in MODEL_DTYPES and not wide:
                raise UnsupportedModelError(f"{name}={shown}: trlax models compute and hold params in float32, "
                                            "bfloat16 or float16 (float64 with jax_enable_x64)")
        self.config = config
        self.spec = spec
        self.dtype = dtype
        self.param_dtype = param_dtype
        # The module reads its own copy of the config, as transformers' modules read theirs when built (the
        # embedding's padding_idx, RoPE, ...); what transformers reads at each call follows `model.config`:
        # `sync_forward_config`, output_router_logits, the pad / decoder start ids outside the module.
        self.module = self.module_for(spec)(config=copy.deepcopy(config), dtype=dtype, param_dtype=param_dtype)
        self._params = params
        self._owner: Any = None  # a value-head wrapper whose params["pretrained_model"] these are
        # Set when the params are sharded (from_pretrained(mesh=...), trlax.sharding.shard_model).
        self.mesh: Mesh | None = None
        self.sharding_rules: ShardingRules | None = None
        if mesh is not None:
            self.use_mesh(mesh, sharding_rules)
        elif sharding_rules is not None:
            raise TrlaxError("sharding_rules only apply with a mesh; pass mesh=jax.sharding.Mesh(...) too")
        # The float dtype of the checkpoint the params were loaded from (None: not loaded),
        # which save_pretrained writes by default; and the checkpoint's GenerationConfig.
        self.storage_dtype: np.dtype | None = None
        self.generation_config: transformers.GenerationConfig | None = None
        self._gradient_checkpointing = False
        self.build_compiled()

    def build_compiled(self) -> None:
        """The jitted forward, the params check and an empty generation cache, bound to this object."""
        self.check_params = ParamsCheck(self.abstract_params, f"this {self.config.model_type} model")
        self.generation_cache = GenerationCache()
        self._forward = jit_forward(self.apply, self.static_forward_arguments, self.trace_settings,
                                    f"this {self.config.model_type} model")

    @classmethod
    def module_for(cls, spec: ArchitectureSpec) -> type[Any]:
        """The Linen class this kind of model builds for a family (its LM: `spec.module`)."""
        return spec.module

    # --- params: one source of truth ----------------------------------------------------
    @property
    def params(self) -> dict[str, Any] | None:
        """The model's params (a nested dict of arrays, Flax paths named as the PyTorch modules); a view's are
        its owning wrapper's `params["pretrained_model"]`, so an assignment to either is seen by both."""
        return self._params if self._owner is None else self._owner.params["pretrained_model"]

    @params.setter
    def params(self, value: dict[str, Any] | None) -> None:
        if self._owner is None:
            self._params = value
        else:
            self._owner.params = {**self._owner.params, "pretrained_model": value}

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA adapter calls use by default: the owning wrapper's policy adapter, or None."""
        return None if self._owner is None else self._owner.params.get(LORA_COLLECTION)

    @property
    def lora_dropout(self) -> float:
        """PEFT's lora_dropout of the adapter calls use by default (`lora`), which training forwards apply to
        its LoRA branches: the owning wrapper's policy adapter's, else 0.0."""
        return 0.0 if self._owner is None else self._owner.lora_dropout

    def view_for(self, owner: Any) -> FlaxPreTrainedModel:
        """This model (same module, config, dtypes, mesh) as a view of `owner.params["pretrained_model"]`."""
        view = type(self)(self.config, self.spec, dtype=self.dtype, param_dtype=self.param_dtype)
        view.mesh, view.sharding_rules = self.mesh, self.sharding_rules
        view.storage_dtype, view.generation_config = self.storage_dtype, self.generation_config
        view.module = self.module
        view.check_params = self.check_params  # same structure: share what it learned
        view._gradient_checkpointing = self._gradient_checkpointing
        view._owner = owner
        return view

    # --- transformers' training switches -------------------------------------------------
    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether forwards rematerialise each transformer block in the backward pass."""
        return self._gradient_checkpointing

    def trace_settings(self) -> tuple[Any, ...]:
        """The settings a traced forward reads, which key the jitted forward's programs: gradient checkpointing
        and the config fields transformers reads per call (synced into the module's config copy:
        `sync_forward_config`)."""
        return self._gradient_checkpointing, self.sync_forward_config()

    def wants_hidden_states(self, output_hidden_states: bool | None) -> bool:
        """A forward's `output_hidden_states`, or for None `config.output_hidden_states`, as transformers reads it."""
        return bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)

    def sync_forward_config(self) -> tuple[Any, ...]:
        """Copies the config fields transformers reads at every forward (`spec.forward_config_fields`, e.g.
        Granite's logits_scaling) from `model.config` into the module's copy, so the next trace reads them;
        returns their values (hashable), which key compiled programs."""
        values = {name: getattr(self.config, name) for name in self.spec.forward_config_fields
                  if hasattr(self.config, name)}
        for name, value in values.items():
            if getattr(self.module.config, name, None) != value:
                setattr(self.module.config, name, copy.deepcopy(value))
        return tuple(tuple(v) if isinstance(v, list) else v for v in values.values())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """transformers' switch: from now on `apply` (and so a train step's `jax.grad` of it) and the jitted
        forward recompute each block's activations in the backward pass (`nn.remat`) instead of storing them.

        Outputs and gradients are unchanged; the residuals JAX saves for the backward pass shrink to each
        block's input, and the backward recomputes each block's forward. XLA:CPU's compiled program holds
        as much memory either way (`benchmarks/remat_memory.py`), so on CPU this costs time (and a little
        memory).
        `gradient_checkpointing_kwargs` (e.g. transformers' `{"use_reentrant": False}`) is accepted and
        ignored: JAX's remat has no reentrant variant. A train step already jitted keeps the program it
        was traced with: enable before tracing it.
        """
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TrlaxTypeError("gradient_checkpointing_kwargs must be a dict (e.g. {'use_reentrant': False}, "
                                 f"accepted and ignored) or None; got {type(gradient_checkpointing_kwargs).__name__}")
        self._gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """transformers' switch back: blocks keep their activations for the backward pass (the default)."""
        self._gradient_checkpointing = False

    def eval(self) -> FlaxPreTrainedModel:
        """transformers' `eval()`: returns this model unchanged (trlax calls run without dropout unless
        `train=True, dropout_rng=key` is passed)."""
        return self

    def train(self, mode: bool = True) -> FlaxPreTrainedModel:
        """transformers' `train()`: `train(False)` is `eval()`; `train(True)` raises TrlaxTypeError, as dropout
        is chosen per call (`train=True, dropout_rng=key`)."""
        refuse_train_mode(mode)
        return self.eval()

    # --- construction -------------------------------------------------------------------
    def dummy_inputs(self) -> tuple[Any, ...]:
        """The smallest inputs `module.init` accepts (ids and masks [1, 1])."""
        ids = jnp.zeros((1, 1), jnp.int32)
        return (ids, jnp.ones_like(ids)) * (2 if self.is_encoder_decoder else 1)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Random params from the module's initialisers (as a fresh model is)."""
        return jax.jit(lambda key: self.module.init(key, *self.dummy_inputs())["params"])(rng)

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: token ids must lie in [0, vocab_size)."""
        return int(self.module.config.vocab_size)

    def abstract_params(self) -> dict[str, Any]:
        """The param tree as ShapeDtypeStructs, computed without allocating anything.

        Tracing `module.init` costs as much as tracing a forward pass, so the tree is traced once
        per module class, config and dtypes in a process (loading the same architecture again,
        a policy and its value model, ...) and each call gets its own copy of the containers.
        """
        def trace() -> dict[str, Any]:
            return jax.eval_shape(lambda: self.module.init(jax.random.key(0), *self.dummy_inputs())["params"])

        try:
            config = self.module.config.to_json_string(use_diff=False)  # what the module is built from
        except (TypeError, ValueError):  # a config attribute JSON cannot hold: trace without the cache
            return trace()
        key = (type(self.module), config, jnp.dtype(self.dtype).name, jnp.dtype(self.param_dtype).name)
        if key not in ABSTRACT_PARAMS:
            if len(ABSTRACT_PARAMS) >= ABSTRACT_PARAMS_KEPT:
                ABSTRACT_PARAMS.pop(next(iter(ABSTRACT_PARAMS)))  # the oldest
            ABSTRACT_PARAMS[key] = trace()
        return jax.tree_util.tree_map(lambda leaf: leaf, ABSTRACT_PARAMS[key])

    @classmethod
    def from_config(
        cls, config: transformers.PretrainedConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        seed: int = 0,
    ) -> FlaxPreTrainedModel:
        """A randomly initialised model of this config (no generation_config: `generate` uses trlax's defaults
        and the config's token ids; assign a transformers.GenerationConfig to change them)."""
        model = cls(config, dtype=dtype, param_dtype=param_dtype)
        model.params = model.init_params(jax.random.key(seed))
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | Any,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        config: transformers.PretrainedConfig | None = None,
        place: Placer | None = None,
        mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
        **transformers_args: Any,
    ) -> FlaxPreTrainedModel:
        """Load a transformers (PyTorch) checkpoint: a local folder, a hub id, or a model in memory.

        Reads config.json, then model.safetensors, a sharded safetensors index, or
        pytorch_model.bin (needs torch). Params are built straight from the file, one
        tensor at a time, cast to `param_dtype` ("auto": the checkpoint's dtype); `dtype` is
        the compute dtype (default float32; "auto" as well). With a `mesh` (axes `data`,
        `fsdp`, `tp`, whichever it has), each tensor goes straight into its sharded layout
        (`trlax.sharding`; `sharding_rules` overrides the defaults). A transformers PyTorch
        model (or a TRL value-head model, whose head a plain LM leaves out) converts from
        its `state_dict()` without touching disk. The checkpoint's generation_config.json
        becomes `generation_config` (for a model that generates); its float dtype
        `storage_dtype` (what `save_pretrained` writes by default). transformers'
        `torch_dtype`, `device_map`, `attn_implementation`, `low_cpu_mem_usage` are
        translated or ignored with a warning, quantisation and `trust_remote_code=True`
        refused (`trlax.checkpoint.loading_args`). A subclass's own keywords
        (`constructor_arguments`, e.g. a classifier's `num_labels`) go to its constructor.
        """
        where = f"{cls.__name__}.from_pretrained"
        extra = translate_loading_args({"dtype": dtype, **transformers_args}, where)
        dtype = extra.pop("dtype")
        model_args = {name: extra.pop(name) for name in cls.constructor_arguments if name in extra}
        if extra:
            raise TrlaxTypeError(f"{where} got unknown keyword argument(s) {sorted(extra)}")
        dtype = jnp.float32 if dtype is None else dtype
        if is_torch_model(pretrained_model_name_or_path):
            if any(v is not None for v in (revision, token, cache_dir, config, place)):
                raise TrlaxTypeError(f"{where}: revision/token/cache_dir/config/place apply to folders and hub ids, "
                                "not to an in-memory PyTorch model")
            return cls.from_torch(pretrained_model_name_or_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules, **model_args)
        options = HubOptions(revision, token, cache_dir, local_files_only)
        resolved = resolve_checkpoint(pretrained_model_name_or_path, options, require_config=config is None)
        config = config or load_config(resolved.folder, resolved.source)
        with CheckpointReader(list(resolved.weight_files)) as reader:
            model = cls.load_from(reader, resolved.source, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules, place=place, **model_args)
        if cls.can_generate:
            model.generation_config = read_generation_config(pretrained_model_name_or_path, options)
        return model

    def use_mesh(self, mesh: Mesh, sharding_rules: ShardingRules | Sequence[ParamRule] | None = None) -> None:
        """Record the mesh and rules this model's params are (to be) sharded with."""
        self.mesh = auto_mesh(mesh)
        self.sharding_rules = resolve_rules(self.config.model_type, sharding_rules)
        check_mesh(self.mesh, self.sharding_rules)

    def placer(self, place: Placer | None = None) -> Placer | None:
        """How the loader puts each tensor on devices: `place`, or the mesh's sharded layout."""
        if self.mesh is None:
            return place
        if place is not None:
            raise TrlaxError("pass either place= (a custom placer) or mesh= (sharded loading), not both")
        return make_placer(self.mesh, self.sharding_rules)

    def sharding_context(self) -> contextlib.AbstractContextManager[None]:
        """Enter around `module.apply` under jit: with a mesh, layer outputs stay batch-sharded
        (see `trlax.sharding.activation_sharding`); without one, nothing happens."""
        return activation_sharding(self.mesh, self.sharding_rules)

    # --- forward ------------------------------------------------------------------------
    def apply_module(self, params: dict[str, Any], *inputs: Any, lora: dict[str, Any] | None, train: bool,
                     dropout_rng: jax.Array | None, lora_dropout: float = 0.0, **kwargs: Any) -> Any:
        """`module.apply` with the params (plus a LoRA adapter tree), dropout only when training (the model's, and
        `lora_dropout` in [0, 1) on the input of the adapter's LoRA branches: `trlax.models.layers.add_lora`), on
        the mesh, blocks rematerialised when gradient checkpointing is enabled."""
        check_dropout_rng(train, dropout_rng)
        check_lora_dropout(lora_dropout)
        self.check_params(params)
        self.sync_forward_config()
        variables = {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}
        with (self.sharding_context(), remat_blocks(self.is_gradient_checkpointing),
              drop_lora_inputs(lora_dropout if train and lora is not None else 0.0)):
            return self.module.apply(variables, *inputs, deterministic=not train,
                                     rngs={"dropout": dropout_rng} if train else None, **kwargs)

    def apply(self, params: dict[str, Any], *inputs: Any, **kwargs: Any) -> Any:
        """The pure forward a jitted step calls; each model kind defines it (see FlaxModelForCausalLM.apply)."""
        raise NotImplementedError

    def check_token_inputs(self, input_ids: Any, attention_mask: Any, position_ids: Any = None, *,
                           past_length: int = 0, traced: bool = False) -> None:
        """Token ids [B, T] in [0, vocab_size), a mask [B, P + T] (P = `past_length`, the cached tokens), positions
        [B, T], positions within a learned position table, else InputError.

        Concrete values are checked here; traced ones only with `traced=True` (checkify, see `trlax.inputs`).
        """
        batch, length = input_ids.shape
        check_shape("attention_mask", attention_mask, (batch, past_length + length))
        check_shape("position_ids", position_ids, input_ids.shape)
        check_token_range("input_ids", input_ids, self.vocab_size, traced=traced)
        new_tokens_mask = attention_mask[:, past_length:] if past_length else attention_mask
        check_positions("input_ids", past_length + length, position_ids, new_tokens_mask,
                        self.spec.position_limit(self.module.config), model=self.config.model_type.upper(),
                        past_length=past_length, traced=traced)

    # --- KV cache of a forward (transformers' `cache` / `past_key_values`) -----------------
    def forward_cache(self, past_key_values: Any, input_ids: jax.Array,
                      use_cache: bool) -> tuple[list[KVCache] | None, int]:
        """(the cache a forward over (decoder) input_ids [B, T] writes, P: the tokens it holds already): the checked
        past_key_values with T slots appended, or a new T-slot cache with `use_cache`, both in the compute dtype;
        else (None, 0)."""
        batch, length = input_ids.shape
        if past_key_values is None:
            cache = self.spec.init_cache(self.module.config, batch, length, self.dtype) if use_cache else None
            return cache, 0
        past = past_kv_cache(past_key_values, self.spec.cache_geometry(self.module.config), batch)
        return extended_cache(past, length, self.dtype), past[0]["k"].shape[2]

    def past_length(self, past_key_values: Any, batch: int) -> int:
        """P, the tokens a forward's `past_key_values` holds (checked against the model and batch); None: 0."""
        if past_key_values is None:
            return 0
        return past_kv_length(past_key_values, self.spec.cache_geometry(self.module.config), batch)

    # --- generation ---------------------------------------------------------------------
    def generation_prompt_length(self, input_ids: jax.Array, decoder_input_ids: Any = None,
                                 decoder_start_token_id: int | None = None) -> int:
        """The prompt length generation_config's max_length / min_length count from (each model kind's)."""
        raise NotImplementedError

    def generate(
        self, input_ids: Any = None, attention_mask: Any = None, *, params: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None, generation_config: transformers.GenerationConfig | None = None,
        **kwargs: Any,
    ) -> GenerateOutput | jax.Array:
        """Jit-compiled generation with a KV cache (`trlax.generation.generate`).

        Settings come from, lowest first: trlax's defaults, `self.generation_config` (the
        checkpoint's generation settings; without any, those of the model config, as
        transformers builds them), `generation_config` (a transformers GenerationConfig),
        keyword arguments (`trlax.generation_config` says which fields apply; unsupported
        ones raise). Without an attention_mask, a causal LM's mask is inferred from the pad id
        as transformers infers it: `input_ids != pad` when the pad id occurs in input_ids, is
        no eos id and ends no row, else all ones; an encoder-decoder's encoder attends to every
        token (transformers 5 infers no mask there). Returns a GenerateOutput,
        or the bare sequences with return_dict_in_generate=False. lora: an adapter tree to
        generate with; without params and lora, the owning LoRA policy's adapter (if any).
        `inputs=` (transformers' name for the prompt) is taken for input_ids [B, T].
        """
        if not self.can_generate:
            raise TrlaxTypeError(f"{type(self).__name__} has no language-model head, so it cannot generate; load the "
                                 "checkpoint with FlaxAutoModelForCausalLM (or ...WithValueHead) to generate")
        if "inputs" in kwargs:
            if input_ids is not None:
                raise TrlaxTypeError("generate got the prompt twice: pass input_ids or inputs (transformers' name "
                                     "for it), not both")
            input_ids = kwargs.pop("inputs")
        if input_ids is None:
            raise TrlaxTypeError("generate needs the prompt: input_ids [B, T] int (or inputs=, transformers' name)")
        if params is None and lora is None:
            lora = self.lora
        input_ids = token_ids("input_ids", input_ids)
        settings = self.generation_config or transformers.GenerationConfig.from_model_config(self.config)
        request = resolve_generation(settings, generation_config, kwargs, prompt_length=lambda start: (
            self.generation_prompt_length(input_ids, kwargs.get("decoder_input_ids"), start)))
        if attention_mask is None and not self.is_encoder_decoder:
            attention_mask = inferred_attention_mask(input_ids, request.kwargs["pad_token_id"],
                                                     request.kwargs["eos_token_id"])
        out = generate(self, input_ids, attention_mask, params=params, lora=lora, **request.kwargs)
        return out if request.return_dict else out.sequences

    # --- info ---------------------------------------------------------------------------
    def num_params(self, params: dict[str, Any] | None = None) -> int:
        """How many numbers `params` (default the model's) hold: the sum of every leaf's size."""
        params = self.params if params is None else params
        return sum(int(np.prod(leaf.shape)) for _, leaf in flatten_paths(params))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_type={self.config.model_type!r}, "
                f"dtype={jnp.dtype(self.dtype).name}, param_dtype={jnp.dtype(self.param_dtype).name})")
