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

from trlax.checkpoint.dtypes import TensorSource, cast_floats, params_float_dtype, stored_float_dtype
from trlax.checkpoint.gather import checkpoint_tensors, host_array, write_checkpoint
from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.loading import LoadReport, Placer, load_params
from trlax.checkpoint.naming import TensorRule, flatten_paths, get_path, hf_tensors, key_table, set_path
from trlax.checkpoint.push import push_to_hub
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.torch_models import StateDictReader, TorchParts, is_torch_model, torch_lm, torch_parts
from trlax.errors import CheckpointError, TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.generation import GenerateOutput, GenerationCache, generate
from trlax.generation_config import read_generation_config, resolve_generation, write_generation_config
from trlax.inputs import ParamsCheck, token_ids
from trlax.models.layers import LORA_COLLECTION
from trlax.models.loading_args import resolve_dtype, translate_loading_args
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
        # The float dtype of the checkpoint the params were loaded from (None: not loaded),
        # which save_pretrained writes by default; and the checkpoint's GenerationConfig.
        self.storage_dtype: np.dtype | None = None
        self.generation_config: transformers.GenerationConfig | None = None
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
        view.storage_dtype, view.generation_config = self.storage_dtype, self.generation_config
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
        becomes `generation_config`; its float dtype `storage_dtype` (what
        `save_pretrained` writes by default). transformers' `torch_dtype`, `device_map`,
        `attn_implementation`, `low_cpu_mem_usage` are translated or ignored with a
        warning, quantisation and `trust_remote_code=True` refused
        (`trlax.models.loading_args`).
        """
        where = f"{cls.__name__}.from_pretrained"
        extra = translate_loading_args({"dtype": dtype, **transformers_args}, where)
        dtype = extra.pop("dtype")
        if extra:
            raise TrlaxTypeError(f"{where} got unknown keyword argument(s) {sorted(extra)}")
        dtype = jnp.float32 if dtype is None else dtype
        if is_torch_model(pretrained_model_name_or_path):
            if any(v is not None for v in (revision, token, cache_dir, config, place)):
                raise TrlaxTypeError(f"{where}: revision/token/cache_dir/config/place apply to folders and hub ids, "
                                "not to an in-memory PyTorch model")
            return cls.from_torch(pretrained_model_name_or_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules)
        options = HubOptions(revision, token, cache_dir, local_files_only)
        resolved = resolve_checkpoint(pretrained_model_name_or_path, options)
        config = config or load_config(resolved.folder, resolved.source)
        with CheckpointReader(list(resolved.weight_files)) as reader:
            model = cls.load_from(reader, resolved.source, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules, place=place)
        model.generation_config = read_generation_config(pretrained_model_name_or_path, options)
        return model

    @classmethod
    def load_from(
        cls, reader: TensorSource, source: str, config: transformers.PretrainedConfig, *, dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None, place: Placer | None = None,
    ) -> FlaxPreTrainedModel:
        """A model of `config` with its params read from an open reader (files or a state dict);
        "auto" dtypes resolve to the reader's float dtype, recorded as `storage_dtype`."""
        stored = stored_float_dtype(reader)
        model = cls(config, dtype=resolve_dtype(dtype, stored), param_dtype=resolve_dtype(param_dtype, stored),
                    mesh=mesh, sharding_rules=sharding_rules)
        model.params, _ = model.load_checkpoint(reader, source, model.key_table(), model.ignored_checkpoint_keys(),
                                                place=model.placer(place))
        model.storage_dtype = stored
        return model

    @classmethod
    def from_torch(
        cls, torch_model: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
    ) -> FlaxPreTrainedModel:
        """Convert a transformers PyTorch model (or the LM of a TRL value-head model) in memory.

        The tensors are read from `state_dict()` (numpy views, no file) and checked as a
        checkpoint is. A PEFT model needs the value-head wrapper (`...WithValueHead.from_pretrained`),
        which keeps the adapter as a LoRA policy, or PEFT's `merge_and_unload()` first.
        """
        parts = torch_parts(torch_model)
        if parts.adapter_state is not None:
            raise UnsupportedModelError(
                f"{type(torch_model).__name__} holds a PEFT adapter: load it with the value-head wrapper "
                "(which keeps it as a LoRA policy), or call merge_and_unload() first")
        return cls.from_parts(parts, type(torch_model).__name__, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                              sharding_rules=sharding_rules)

    @classmethod
    def from_parts(
        cls, parts: TorchParts, source: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        mesh: Mesh | None = None, sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
    ) -> FlaxPreTrainedModel:
        """The LM of a PyTorch model taken apart (`trlax.checkpoint.torch_models.torch_parts`): a copy
        of its config and generation config, params from its state dict."""
        config = parts.config.__class__.from_dict(parts.config.to_dict())
        with StateDictReader(parts.lm_state) as reader:
            model = cls.load_from(reader, source, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules)
        if parts.generation_config is not None:
            model.generation_config = transformers.GenerationConfig.from_dict(parts.generation_config.to_dict())
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
        self, reader: TensorSource, source: str, table: dict[str, TensorRule], ignored: tuple[str, ...], *,
        optional_prefixes: tuple[str, ...] = (), place: Placer | None = None,
    ) -> tuple[dict[str, Any], LoadReport]:
        """Read `table`'s tensors from an open reader (see `load_params`).

        Keys transformers fills itself (`spec.key_defaults`: T5's tied-back `lm_head`, BART's
        zero `final_logits_bias`) may be absent; they are then filled the same way.
        """
        defaults = {k: src for k, src in self.spec.key_defaults(self.config).items() if k in table}
        kwargs = {} if place is None else {"place": place}
        params, report = load_params(reader, table, source=source, base_model_prefix=self.spec.base_model_prefix,
                                     ignored=ignored, optional_prefixes=(*optional_prefixes, *defaults),
                                     slice_reads=self.mesh is not None, **kwargs)
        for key in [k for k in report.missing_optional if k in defaults]:
            rule, src = table[key], defaults[key]
            if src is None:
                array = np.zeros(rule.shape, rule.dtype)
            else:  # go through the HF layout: `src` may be an embedding and `key` a kernel
                array = rule.to_flax(table[src].to_hf(np.asarray(get_path(params, table[src].path))))
            set_path(params, rule.path, jax.device_put(array) if place is None else place(rule.path, array))
            report.missing_optional.remove(key)
            logger.info("%s has no %s; initialised it from %s as transformers does", source, key, src or "zeros")
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

    # --- generation ---------------------------------------------------------------------
    def generation_prompt_length(self, input_ids: jax.Array, decoder_input_ids: Any = None) -> int:
        raise NotImplementedError

    def generate(
        self, input_ids: Any, attention_mask: Any = None, *, params: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None, generation_config: transformers.GenerationConfig | None = None,
        **kwargs: Any,
    ) -> GenerateOutput | jax.Array:
        """Jit-compiled generation with a KV cache (`trlax.generation.generate`).

        Settings come from, lowest first: trlax's defaults, `self.generation_config` (the
        checkpoint's generation_config.json), `generation_config` (a transformers
        GenerationConfig), keyword arguments (`trlax.generation_config` says which fields
        apply; unsupported ones raise). Returns a GenerateOutput, or the bare sequences
        with return_dict_in_generate=False. lora: an adapter tree to generate with; without
        params and lora, the owning LoRA policy's adapter (if any).
        """
        if params is None and lora is None:
            lora = self.lora
        input_ids = token_ids("input_ids", input_ids)
        length = self.generation_prompt_length(input_ids, kwargs.get("decoder_input_ids"))
        request = resolve_generation(self.generation_config, generation_config, kwargs, prompt_length=length)
        out = generate(self, input_ids, attention_mask, params=params, lora=lora, **request.kwargs)
        return out if request.return_dict else out.sequences

    # --- saving ---------------------------------------------------------------------------
    def state_dict(self, params: dict[str, Any] | None = None, dtype: Any = None) -> dict[str, np.ndarray]:
        """The params as a transformers (PyTorch) state dict of numpy arrays (tied copies left out),
        floats cast to `dtype` when given.

        Host-only: params sharded over several processes raise MultiHostError (save them
        with `save_pretrained`, called on every process)."""
        params = self.params if params is None else params
        self.check_params(params)
        instead = "model.save_pretrained(folder), called on every process, which gathers one tensor at a time"
        state = dict(hf_tensors(self.key_table(params), params, fetch=lambda leaf: host_array(leaf, instead=instead)))
        return state if dtype is None else cast_floats(state, dtype)

    def save_dtype(self, params: dict[str, Any] | None = None, dtype: Any = None) -> np.dtype:
        """The float dtype a save writes: `dtype`, else the checkpoint's (`storage_dtype`), else the params'."""
        if dtype is not None:
            return np.dtype(resolve_dtype(dtype, self.storage_dtype))
        if self.storage_dtype is not None:
            return np.dtype(self.storage_dtype)
        params = self.params if params is None else params
        found = params_float_dtype(leaf for _, leaf in flatten_paths(params))
        return np.dtype(found if found is not None else np.float32)

    def config_to_save(self, dtype: Any = None) -> transformers.PretrainedConfig:
        """A copy of the config whose `architectures` names transformers' class for this model_type
        (one SPEC may serve several types: Qwen2ForCausalLM, not LlamaForCausalLM) and whose
        `dtype` is the dtype of the tensors written with it (when given)."""
        names = (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if self.is_encoder_decoder
                 else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.architectures = [names.get(config.model_type, self.spec.hf_architecture)]
        if dtype is not None:
            config.dtype = jnp.dtype(dtype).name
        return config

    def write_config_files(self, folder: Path, dtype: Any) -> None:
        """config.json (stating `dtype`) and, when the model has one, generation_config.json."""
        self.config_to_save(dtype).save_pretrained(str(folder))
        if self.generation_config is not None:
            write_generation_config(self.generation_config, folder)

    def save_pretrained(
        self, save_directory: str | os.PathLike, params: dict[str, Any] | None = None,
        max_shard_size: int | str | None = None, dtype: Any = None,
    ) -> list[Path]:
        """Write config.json + model.safetensors (or shards + index) with transformers' key names.

        The folder loads in transformers (PyTorch) and back in trlax. Floats are written in
        `dtype` (default: the dtype of the checkpoint the model was loaded from, else the
        params'), and config.json's `dtype` says so. Written atomically: a failed save
        leaves no half-written checkpoint. Params sharded over several processes: call it on
        every process; process 0 writes while the tensors are gathered one at a time
        (`trlax.checkpoint.gather`); the others return [].
        """
        params = self.params if params is None else params
        self.check_params(params)
        dtype = self.save_dtype(params, dtype)
        return write_checkpoint(save_directory, checkpoint_tensors(params, self.key_table(params), dtype),
                                write_extra=lambda tmp: self.write_config_files(tmp, dtype),
                                max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, *, params: dict[str, Any] | None = None,
                    max_shard_size: int | str | None = None, dtype: Any = None, **hub_args: Any) -> Any:
        """Upload what save_pretrained(max_shard_size=, dtype=) writes to a hub repo; `hub_args`
        go to `trlax.checkpoint.push.push_to_hub` (commit_message, private, token, revision, ...)."""
        return push_to_hub(lambda folder: self.save_pretrained(folder, params=params, max_shard_size=max_shard_size,
                                                               dtype=dtype), repo_id, **hub_args)

    def to_torch(self, params: dict[str, Any] | None = None, dtype: Any = None) -> Any:
        """The transformers (PyTorch) model with these weights, in memory (needs torch).

        dtype: its float dtype, as `save_pretrained` chooses it by default. A LoRA policy's
        LM is the base alone; the wrapper's `to_torch` adds the adapter and value head.
        """
        dtype = self.save_dtype(params, dtype)
        tied = set(self.spec.tied_keys(self.config))
        return torch_lm(self.config_to_save(dtype), self.state_dict(params, dtype), self.is_encoder_decoder, tied)

    # --- info ---------------------------------------------------------------------------
    def num_params(self, params: dict[str, Any] | None = None) -> int:
        params = self.params if params is None else params
        return sum(int(np.prod(leaf.shape)) for _, leaf in flatten_paths(params))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_type={self.config.model_type!r}, "
                f"dtype={jnp.dtype(self.dtype).name}, param_dtype={jnp.dtype(self.param_dtype).name})")
