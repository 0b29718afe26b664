"""A trlax model's transformers checkpoint I/O: key tables, loading, saving, PyTorch both ways.

`CheckpointMixin` is the half of `trlax.models.base.FlaxPreTrainedModel` that speaks
transformers' formats: the HF state-dict key table, loading params from an open reader
(files or a PyTorch state dict; `from_pretrained` resolves the folder or hub id and
calls `load_from`), `state_dict`, `save_pretrained`, `push_to_hub` and `to_torch`. It
reads what the model class provides: `config`, `spec` (the family's `ArchitectureSpec`),
`params`, `check_params`, `mesh`, `storage_dtype`, `generation_config`,
`is_encoder_decoder`, `can_generate`, `abstract_params()` and `placer()`, and builds models
with `cls(config, dtype=, param_dtype=, mesh=, sharding_rules=, **model_args)`. A model
class with a head of its own that checkpoints may lack (a classifier's `score`) names it in
`optional_checkpoint_prefixes` and initialises it in `complete_params`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from trlax.checkpoint.dtypes import SAVE_DTYPES, TensorSource, cast_floats, params_float_dtype, stored_float_dtype
from trlax.checkpoint.gather import checkpoint_tensors, host_array, write_checkpoint
from trlax.checkpoint.loading import LoadReport, Placer, load_params
from trlax.checkpoint.loading_args import auto_dtype, resolve_dtype
from trlax.checkpoint.naming import TensorRule, flatten_paths, get_path, hf_tensors, key_table, set_path
from trlax.checkpoint.push import push_to_hub
from trlax.checkpoint.saving_args import check_saving_args
from trlax.checkpoint.torch_models import StateDictReader, TorchParts, torch_model, torch_parts
from trlax.errors import CheckpointError, UnsupportedModelError
from trlax.generation_config import write_generation_config

if TYPE_CHECKING:
    from trlax.models.spec import ParamRule
    from trlax.sharding import ShardingRules

logger = logging.getLogger("trlax")

# Keys a plain LM knowingly skips in a TRL checkpoint (the value head lives beside it).
VALUE_HEAD_KEYS = r"^v_head\."


class CheckpointMixin:
    """transformers checkpoint I/O for a trlax model class (see the module docstring)."""

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

    def tensors_to_save(self, params: dict[str, Any], dtype: Any, path_prefix: tuple[str, ...] = ()) -> dict[str, Any]:
        """HF key -> tensor of the params at `path_prefix` in `params` (the whole tree: a wrapper's, or the LM's
        with no prefix), as a save writes them: floats in `dtype` (`spec.float32_keys` float32 when it is
        float16, as transformers saves a float16 T5's `wo`); see `trlax.checkpoint.gather.checkpoint_tensors`."""
        table = self.key_table(get_path(params, path_prefix) if path_prefix else params, path_prefix=path_prefix)
        return checkpoint_tensors(params, table, dtype, self.spec.float32_keys)

    def ignored_checkpoint_keys(self, value_head: bool = True) -> tuple[str, ...]:
        """Regexes of checkpoint keys a load skips knowingly: buffers, tied copies and (for a
        plain LM reading a TRL checkpoint, `value_head=True`) TRL's `v_head.*`."""
        tied = tuple(rf"^{k.replace('.', r'[.]')}$" for k in self.spec.tied_keys(self.config))
        return (*self.spec.ignored_keys, *tied, *((VALUE_HEAD_KEYS,) if value_head else ()))

    def tied_copies(self) -> dict[str, str]:
        """The tied keys a load reads through the tensor they copy (`spec.tied_keys`): key -> that tensor's key."""
        return self.spec.tied_keys(self.config)

    def check_tied_copies(self, reader: TensorSource, source: str) -> None:
        """CheckpointError when the checkpoint stores a tied copy (e.g. `lm_head.weight` with
        `tie_word_embeddings`) that differs from the tensor it copies: transformers then unties the
        two (and warns); trlax, whose module has one tensor for both, would use the wrong one."""
        keys = set(reader.keys())
        for key, copied in self.tied_copies().items():
            if key in keys and copied in keys and not np.array_equal(reader.get(key), reader.get(copied)):
                raise CheckpointError(
                    f"{source}: the config ties {key} to {copied}, but the checkpoint stores the two with different "
                    f"values; if {key} is meant to be its own tensor, set tie_word_embeddings=false in its "
                    "config.json (transformers unties the two for such a checkpoint)")

    def check_checkpoint_class(self, source: str) -> None:
        """CheckpointError naming the class that loads it when the config says the checkpoint is a sequence
        classifier (`architectures`: `*ForSequenceClassification`, a `score` head and no LM head) and this
        model generates (an LM, the LM of a value-head wrapper)."""
        classifier = [name for name in self.config.architectures or () if name.endswith("ForSequenceClassification")]
        if classifier and self.can_generate and self.is_encoder_decoder:
            raise CheckpointError(f"{source} is a sequence-classification checkpoint ({classifier[0]}), not a "
                                  "seq2seq LM; trlax has no encoder-decoder classifier: use a seq2seq LM checkpoint")
        if classifier and self.can_generate:
            raise CheckpointError(
                f"{source} is a sequence-classification checkpoint ({classifier[0]}: a `score` head, no LM head); "
                "load it with FlaxAutoModelForSequenceClassification (a reward or value model), or use a "
                "language-model checkpoint here")

    def optional_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Key prefixes a checkpoint may lack (a head the model initialises itself); none by default."""
        return ()

    def complete_params(self, params: dict[str, Any], missing: list[str], source: str,
                        place: Placer | None) -> dict[str, Any]:
        """The loaded params with the `missing` keys of `optional_checkpoint_prefixes` initialised
        (placed with `place` when given); the base class has none to fill."""
        return params

    @classmethod
    def load_from(
        cls, reader: TensorSource, source: str, config: transformers.PretrainedConfig, *, dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None, place: Placer | None = None,
        **model_args: Any,
    ) -> Self:
        """A model of `config` (built with `model_args`, a subclass's own constructor arguments) with
        its params read from an open reader (files or a state dict); "auto" dtypes resolve to the
        config's `dtype`, else the reader's float dtype (`auto_dtype`); the reader's is recorded as
        `storage_dtype`."""
        stored = stored_float_dtype(reader)
        auto = auto_dtype(config, stored)
        model = cls(config, dtype=resolve_dtype(dtype, auto), param_dtype=resolve_dtype(param_dtype, auto),
                    mesh=mesh, sharding_rules=sharding_rules, **model_args)
        placer = model.placer(place)
        params, report = model.load_checkpoint(reader, source, model.key_table(), model.ignored_checkpoint_keys(),
                                               optional_prefixes=model.optional_checkpoint_prefixes(), place=placer)
        model.params = model.complete_params(params, report.missing_optional, source, placer)
        model.storage_dtype = stored
        return model

    @classmethod
    def from_torch(
        cls, torch_model: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, mesh: Mesh | None = None,
        sharding_rules: ShardingRules | Sequence[ParamRule] | None = None, **model_args: Any,
    ) -> Self:
        """Convert a transformers PyTorch model (or the LM of a TRL value-head model) in memory.

        The tensors are read from `state_dict()` (numpy views, no file) and checked as a
        checkpoint is. A PEFT model needs the value-head wrapper (`...WithValueHead.from_pretrained`),
        which keeps the adapter as a LoRA policy, or PEFT's `merge_and_unload()` first.
        `model_args`: a subclass's own constructor arguments.
        """
        parts = torch_parts(torch_model)
        if parts.adapter_state is not None:
            what = type(torch_model).__name__
            task = getattr(parts.adapter_config, "task_type", None)
            if getattr(task, "value", task) == "SEQ_CLS":  # PEFT's TaskType enum, or its string
                raise UnsupportedModelError(f"{what} holds a PEFT sequence-classification adapter, which trlax loads "
                                            "from its folder: save_pretrained(folder), then FlaxAutoModelFor"
                                            "SequenceClassification.from_pretrained(folder); or merge_and_unload()")
            raise UnsupportedModelError(f"{what} holds a PEFT adapter: load it with the value-head wrapper "
                                        "(which keeps it as a LoRA policy), or call merge_and_unload() first")
        return cls.from_parts(parts, type(torch_model).__name__, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                              sharding_rules=sharding_rules, **model_args)

    @classmethod
    def from_parts(
        cls, parts: TorchParts, source: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        mesh: Mesh | None = None, sharding_rules: ShardingRules | Sequence[ParamRule] | None = None,
        **model_args: Any,
    ) -> Self:
        """The LM of a PyTorch model taken apart (`trlax.checkpoint.torch_models.torch_parts`): a copy
        of its config and (for a model that generates) generation config, params from its state dict."""
        config = parts.config.__class__.from_dict(parts.config.to_dict())
        with StateDictReader(parts.lm_state) as reader:
            model = cls.load_from(reader, source, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  sharding_rules=sharding_rules, **model_args)
        if parts.generation_config is not None and cls.can_generate:
            model.generation_config = transformers.GenerationConfig.from_dict(parts.generation_config.to_dict())
        return model

    def load_checkpoint(
        self, reader: TensorSource, source: str, table: dict[str, TensorRule], ignored: tuple[str, ...], *,
        optional_prefixes: tuple[str, ...] = (), place: Placer | None = None,
    ) -> tuple[dict[str, Any], LoadReport]:
        """Read `table`'s tensors from an open reader (see `load_params`).

        Keys transformers fills itself (`spec.key_defaults`: T5's tied-back `lm_head`, BART's
        zero `final_logits_bias`) may be absent; they are then filled the same way.
        """
        self.check_checkpoint_class(source)
        self.check_tied_copies(reader, source)
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

    def state_dict(self, params: dict[str, Any] | None = None, dtype: Any = None) -> dict[str, np.ndarray]:
        """The params as a transformers (PyTorch) state dict of numpy arrays (tied copies left out),
        floats cast to `dtype` when given (`spec.float32_keys` float32 when it is float16, as transformers;
        any dtype `save_pretrained` takes: "auto" is the checkpoint's, a torch dtype, not an integer one).

        Host-only: params sharded over several processes raise MultiHostError (save them
        with `save_pretrained`, called on every process)."""
        params = self.params if params is None else params
        self.check_params(params)
        instead = "model.save_pretrained(folder), called on every process, which gathers one tensor at a time"
        state = dict(hf_tensors(self.key_table(params), params, fetch=lambda leaf: host_array(leaf, instead=instead)))
        return state if dtype is None else cast_floats(state, self.save_dtype(params, dtype), self.spec.float32_keys)

    def save_dtype(self, params: dict[str, Any] | None = None, dtype: Any = None) -> np.dtype:
        """The float dtype a save writes: `dtype`, else the checkpoint's (`storage_dtype`), else the params'."""
        if dtype is not None:
            resolved = np.dtype(resolve_dtype(dtype, self.storage_dtype))
            if resolved.name not in SAVE_DTYPES:  # checked before anything is written
                raise UnsupportedModelError(f"cannot save the weights as {resolved.name}: pass a float dtype "
                                            "transformers loads (float32, bfloat16, float16)")
            return resolved
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
        max_shard_size: int | str | None = None, dtype: Any = None, **transformers_args: Any,
    ) -> list[Path]:
        """Write config.json + model.safetensors (or shards + index) with transformers' key names.

        The folder loads in transformers (PyTorch) and back in trlax. Floats are written in
        `dtype` (default: the dtype of the checkpoint the model was loaded from, else the
        params'), and config.json's `dtype` says so. Written atomically: a failed save
        leaves no half-written checkpoint. Params sharded over several processes: call it on
        every process; process 0 writes while the tensors are gathered one at a time
        (`trlax.checkpoint.gather`); the others return []. transformers' saving keywords:
        `trlax.checkpoint.saving_args` (safe_serialization=True is accepted, others refused).
        """
        check_saving_args(transformers_args, f"{type(self).__name__}.save_pretrained")
        params = self.params if params is None else params
        self.check_params(params)
        dtype = self.save_dtype(params, dtype)
        return write_checkpoint(save_directory, self.tensors_to_save(params, dtype),
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
        return torch_model(self.config_to_save(dtype), self.state_dict(params, dtype), tied, self.generation_config)
