"""The model object: a Linen module, its transformers config and its params, with HF I/O.

Like transformers' old Flax API, every call takes `params=` (default: `self.params`) and
is jit-compiled once per input shape; the module itself is pure.

Params have one home. A standalone model holds its own; the LM inside a value-head
wrapper (`wrapper.pretrained_model`) is a view that reads and writes
`wrapper.params["pretrained_model"]` (and uses the wrapper's LoRA policy adapter, if
any), so assigning the wrapper's params is seen by the LM's forward and generation too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from trlax.checkpoint.hub import HubOptions, ResolvedCheckpoint, resolve_checkpoint
from trlax.checkpoint.loading import LoadReport, Placer, load_params
from trlax.checkpoint.naming import TensorRule, flatten_paths, get_path, hf_tensors, key_table, set_path
from trlax.checkpoint.push import push_to_hub
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.writer import write_checkpoint_dir
from trlax.errors import CheckpointError, TrlaxError, UnsupportedModelError
from trlax.generation import GenerationCache
from trlax.inputs import ParamsCheck
from trlax.models.layers import LORA_COLLECTION
from trlax.models.registry import get_spec, supported_model_types
from trlax.models.spec import ArchitectureSpec, ParamRule
from trlax.sharding import ShardingRules, activation_sharding, auto_mesh, make_placer, resolve_rules

logger = logging.getLogger("trlax")

# Keys a plain LM knowingly skips in a TRL checkpoint (the value head lives beside it).
VALUE_HEAD_KEYS = r"^v_head\."


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


class FlaxPreTrainedModel:
    """A trlax model: `module` (Linen), `config` (transformers), `params` (plain dict).

    `FlaxPreTrainedModel(config)` is a model without params (enough for names, shapes and
    `abstract_params`); `from_config` initialises params, `from_pretrained` loads them.
    """

    is_encoder_decoder: ClassVar[bool] = False

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
        self.config = config
        self.spec = spec
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.module = self.module_for(spec)(config=config, dtype=dtype, param_dtype=param_dtype)
        self._params = params
        self._owner: Any = None  # a value-head wrapper whose params["pretrained_model"] these are
        # Set when the params are sharded (from_pretrained(mesh=...), trlax.sharding.shard_model).
        self.mesh: Mesh | None = None
        self.sharding_rules: ShardingRules | None = None
        if mesh is not None:
            self.use_mesh(mesh, sharding_rules)
        elif sharding_rules is not None:
            raise TrlaxError("sharding_rules only apply with a mesh; pass mesh=jax.sharding.Mesh(...) too")
        self.generation_cache = GenerationCache()
        self.check_params = ParamsCheck(self.abstract_params, f"this {config.model_type} model")
        self._forward = jax.jit(self.apply, static_argnames=("train", "output_hidden_states"))

    @classmethod
    def module_for(cls, spec: ArchitectureSpec) -> type[Any]:
        """The Linen class this kind of model builds for a family (its LM: `spec.module`)."""
        return spec.module

    # --- params: one source of truth ----------------------------------------------------
    @property
    def params(self) -> dict[str, Any] | None:
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

    def view_for(self, owner: Any) -> FlaxPreTrainedModel:
        """This model (same module, config, dtypes, mesh) as a view of `owner.params["pretrained_model"]`."""
        view = type(self)(self.config, self.spec, dtype=self.dtype, param_dtype=self.param_dtype)
        view.mesh, view.sharding_rules = self.mesh, self.sharding_rules
        view.module = self.module
        view.check_params = self.check_params  # same structure: share what it learned
        view._owner = owner
        return view

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
        return int(self.config.vocab_size)

    def abstract_params(self) -> dict[str, Any]:
        """The param tree as ShapeDtypeStructs, computed without allocating anything."""
        return jax.eval_shape(lambda: self.module.init(jax.random.key(0), *self.dummy_inputs())["params"])

    @classmethod
    def from_config(
        cls, config: transformers.PretrainedConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        seed: int = 0,
    ) -> FlaxPreTrainedModel:
        """A randomly initialised model of this config."""
        model = cls(config, dtype=dtype, param_dtype=param_dtype)
        model.params = model.init_params(jax.random.key(seed))
        return model

    def key_table(
        self, abstract: dict[str, Any] | None = None, path_prefix: tuple[str, ...] = ()
    ) -> dict[str, TensorRule]:
        """HF state-dict key -> where it lives in this model's params (BART's raw keys included)."""
        abstract = abstract if abstract is not None else self.abstract_params()
        raw = self.spec.raw_keys
        table = key_table({k: v for k, v in abstract.items() if k not in raw}, path_prefix=path_prefix,
                          keep_layout=self.spec.keep_layout, stacked=self.spec.stacked_weights)
        for name in raw:  # stored under its own name, never transposed
            table[name] = TensorRule((*path_prefix, name), False, tuple(abstract[name].shape), abstract[name].dtype)
        return table

    def ignored_checkpoint_keys(self, value_head: bool = True) -> tuple[str, ...]:
        """Regexes of checkpoint keys a load skips knowingly: buffers, tied copies and (for a
        plain LM reading a TRL checkpoint, `value_head=True`) TRL's `v_head.*`."""
        tied = tuple(rf"^{k.replace('.', r'[.]')}$" for k in self.spec.tied_keys(self.config))
        return (*self.spec.ignored_keys, *tied, *((VALUE_HEAD_KEYS,) if value_head else ()))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        config: transformers.PretrainedConfig | None = None,
        place: Placer | None = None,
        mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
    ) -> FlaxPreTrainedModel:
        """Load a transformers (PyTorch) checkpoint: a local folder or a hub id.

        Reads config.json, then model.safetensors, a sharded safetensors index, or
        pytorch_model.bin (needs torch). Params are built straight from the file, one
        tensor at a time, cast to `param_dtype`; `dtype` is the compute dtype. With a
        `mesh` (axes `data`, `fsdp`, `tp`, whichever it has), each tensor goes straight
        into its sharded layout (`trlax.sharding`; `sharding_rules` overrides the defaults).
        """
        resolved = resolve_checkpoint(pretrained_model_name_or_path,
                                      HubOptions(revision, token, cache_dir, local_files_only))
        config = config or load_config(resolved.folder, resolved.source)
        model = cls(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, sharding_rules=sharding_rules)
        model.params, _ = model.load_checkpoint(resolved, model.key_table(), model.ignored_checkpoint_keys(),
                                                place=model.placer(place))
        return model

    def use_mesh(self, mesh: Mesh, sharding_rules: ShardingRules | Sequence[ParamRule] | None = None) -> None:
        """Record the mesh and rules this model's params are (to be) sharded with."""
        self.mesh = auto_mesh(mesh)
        self.sharding_rules = resolve_rules(self.config.model_type, sharding_rules)

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

    def load_checkpoint(
        self, resolved: ResolvedCheckpoint, table: dict[str, TensorRule], ignored: tuple[str, ...], *,
        optional_prefixes: tuple[str, ...] = (), place: Placer | None = None,
    ) -> tuple[dict[str, Any], LoadReport]:
        """Read `table`'s tensors from the resolved files (see `load_params`).

        Keys transformers fills itself (`spec.key_defaults`: T5's tied-back `lm_head`, BART's
        zero `final_logits_bias`) may be absent; they are then filled the same way.
        """
        defaults = {k: src for k, src in self.spec.key_defaults(self.config).items() if k in table}
        with CheckpointReader(list(resolved.weight_files)) as reader:
            kwargs = {} if place is None else {"place": place}
            params, report = load_params(reader, table, source=resolved.source, ignored=ignored,
                                         optional_prefixes=(*optional_prefixes, *defaults), **kwargs)
        for key in [k for k in report.missing_optional if k in defaults]:
            rule, src = table[key], defaults[key]
            if src is None:
                array = np.zeros(rule.shape, rule.dtype)
            else:  # go through the HF layout: `src` may be an embedding and `key` a kernel
                array = rule.to_flax(table[src].to_hf(np.asarray(get_path(params, table[src].path))))
            set_path(params, rule.path, jax.device_put(array) if place is None else place(rule.path, array))
            report.missing_optional.remove(key)
            logger.info("%s has no %s; initialised it from %s as transformers does", resolved.source, key,
                        src or "zeros")
        return params, report

    # --- forward ------------------------------------------------------------------------
    def apply_module(self, params: dict[str, Any], *inputs: Any, lora: dict[str, Any] | None, train: bool,
                     dropout_rng: jax.Array | None, **kwargs: Any) -> Any:
        """`module.apply` with the params (plus a LoRA adapter tree), dropout only when training, on the mesh."""
        if train and dropout_rng is None:
            raise TrlaxError("train=True needs dropout_rng (a jax.random key) for dropout")
        self.check_params(params)
        variables = {"params": params} if lora is None else {"params": params, LORA_COLLECTION: lora}
        with self.sharding_context():
            return self.module.apply(variables, *inputs, deterministic=not train,
                                     rngs={"dropout": dropout_rng} if train else None, **kwargs)

    def apply(self, params: dict[str, Any], *inputs: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    # --- saving -------------------------------------------------------------------------
    def state_dict(self, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The params as a transformers (PyTorch) state dict of numpy arrays (tied copies left out)."""
        params = self.params if params is None else params
        self.check_params(params)
        return dict(hf_tensors(self.key_table(params), params))

    def config_to_save(self) -> transformers.PretrainedConfig:
        """A copy of the config whose `architectures` names transformers' class for this model_type
        (one SPEC may serve several types: Qwen2ForCausalLM, not LlamaForCausalLM)."""
        names = (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if self.is_encoder_decoder
                 else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.architectures = [names.get(config.model_type, self.spec.hf_architecture)]
        return config

    def save_pretrained(
        self, save_directory: str | os.PathLike, params: dict[str, Any] | None = None,
        max_shard_size: int | str | None = None,
    ) -> list[Path]:
        """Write config.json + model.safetensors (or shards + index) with transformers' key names.

        The folder loads in transformers (PyTorch) and back in trlax. Written atomically:
        a failed save leaves no half-written checkpoint.
        """
        config = self.config_to_save()
        return write_checkpoint_dir(save_directory, self.state_dict(params),
                                    write_extra=lambda tmp: config.save_pretrained(str(tmp)),
                                    max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, *, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Upload what save_pretrained writes to a hub repo (see `trlax.checkpoint.push.push_to_hub`)."""
        return push_to_hub(lambda folder: self.save_pretrained(folder, params=params), repo_id, **kwargs)

    # --- info ---------------------------------------------------------------------------
    def num_params(self, params: dict[str, Any] | None = None) -> int:
        params = self.params if params is None else params
        return sum(int(np.prod(leaf.shape)) for _, leaf in flatten_paths(params))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_type={self.config.model_type!r}, "
                f"dtype={jnp.dtype(self.dtype).name}, param_dtype={jnp.dtype(self.param_dtype).name})")
