"""TRL's value head and the `*WithValueHead` wrappers, as pure functions over one param pytree.

The wrapper's params are `{"pretrained_model": <LM params>, "v_head": {"summary":
{"kernel": [H, 1], "bias": [1]}}}`; saved checkpoints hold the LM's transformers keys plus
TRL's `v_head.summary.weight` [1, H] / `v_head.summary.bias` [1], in the same files.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh

from trlax.checkpoint.dtypes import stored_float_dtype
from trlax.checkpoint.gather import checkpoint_tensors, host_array, host_tree, on_writer_process, write_checkpoint
from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.loading_args import auto_dtype, resolve_dtype, translate_loading_args
from trlax.checkpoint.naming import get_path, key_table, set_path
from trlax.checkpoint.push import push_to_hub
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.saving_args import check_saving_args
from trlax.checkpoint.torch_models import (
    TorchParts,
    add_reward_adapter,
    is_torch_model,
    is_torch_tensor,
    peft_lm,
    tensor_to_numpy,
    torch_parts,
    trl_value_head_model,
)
from trlax.checkpoint.writer import SAFE_WEIGHTS_INDEX_NAME
from trlax.errors import CheckpointError, InputError, TrlaxError, TrlaxTypeError, UnsupportedModelError
from trlax.generation_config import read_generation_config
from trlax.inputs import (
    ParamsCheck,
    check_dropout_rng,
    mask_for,
    refuse_unsupported_arguments,
    same_shape,
    token_ids,
    with_live_params,
)
from trlax.models.auto import AutoModel, FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM
from trlax.models.base import (
    FlaxPreTrainedModel,
    RebuildsCompiled,
    jit_forward,
    kv_cache_argument,
    load_config,
    refuse_train_mode,
)
from trlax.models.layers import LORA_COLLECTION, torch_linear_init
from trlax.peft.lora import (
    PEFT_PREFIX,
    AdapterFiles,
    LoraConfig,
    check_applied,
    is_adapter_folder,
    lora_from_peft,
    peft_state_dict,
    trainable_lora_mask,
)
from trlax.peft.policy import (
    DEFAULT_REWARD_ADAPTER_NAME,
    POLICY_ADAPTER_NAME,
    VALUE_HEAD_KEYS,
    PolicyAdapter,
    load_adapter_policy,
    new_policy_adapter,
    write_adapter_policy,
)
from trlax.peft.reward import SCORE_MODULE, load_reward_adapter, reward_adapter_from, reward_scores
from trlax.sharding import shard_params

logger = logging.getLogger("trlax")

V_HEAD_PREFIX = "v_head."
V_HEAD_INIT_STRATEGIES = (None, "normal")


def value_head_hidden_size(config: transformers.PretrainedConfig) -> int:
    """Width of the LM head's input, looked up as TRL does.

    `word_embed_proj_dim` (OPT-350m projects before the head), then `hidden_size`, then
    `text_config.hidden_size` (multimodal), then `decoder.hidden_size` (encoder-decoder).
    """
    decoder = getattr(config, "decoder", None) if getattr(config, "is_encoder_decoder", False) else None
    for source, name in ((config, "word_embed_proj_dim"), (config, "hidden_size"),
                         (getattr(config, "text_config", None), "hidden_size"), (decoder, "hidden_size")):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    raise TrlaxError(
        "Cannot determine the value head's hidden size from the model config: none of "
        "`word_embed_proj_dim`, `hidden_size`, `text_config.hidden_size`, `decoder.hidden_size` is set."
    )


class ValueHead(nn.Module):
    """Dropout, then a float32 dense H -> 1: values [B, T] float32 from hidden states [B, T, H].

    init_strategy None = PyTorch's nn.Linear default (uniform +-1/sqrt(H), non-zero
    bias), as TRL; "normal" = N(0, initializer_range) weights and a zero bias.
    """

    hidden_size: int
    dropout_prob: float | None = 0.1
    init_strategy: str | None = None
    initializer_range: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, numbers.Integral):
            raise TrlaxTypeError(
                f"ValueHead takes the hidden size H (an int), got {type(self.hidden_size).__name__}: trlax's is a "
                "Flax module, ValueHead(H, dropout_prob, init_strategy, initializer_range); TRL's ValueHead(config, "
                "**kwargs) is trlax.value_head.make_value_head(config, summary_dropout_prob=..., ...)")
        super().__post_init__()

    def setup(self) -> None:
        if self.init_strategy == "normal":
            kernel_init, bias_init = nn.initializers.normal(self.initializer_range), nn.initializers.zeros
        else:
            kernel_init = bias_init = torch_linear_init(self.hidden_size)
        self.summary = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                                kernel_init=kernel_init, bias_init=bias_init)
        self.dropout = nn.Dropout(self.dropout_prob) if self.dropout_prob else None

    def __call__(self, hidden_states: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.dropout is not None:
            hidden_states = self.dropout(hidden_states, deterministic=deterministic)
        return self.summary(hidden_states.astype(jnp.float32))[..., 0]


def make_value_head(
    config: transformers.PretrainedConfig,
    summary_dropout_prob: float | None = 0.1,
    v_head_initializer_range: float = 0.2,
    v_head_init_strategy: str | None = None,
) -> ValueHead:
    """The ValueHead TRL builds for this config (a `summary_dropout_prob` on the config wins)."""
    if v_head_init_strategy not in V_HEAD_INIT_STRATEGIES:
        raise TrlaxError(f"v_head_init_strategy must be one of {V_HEAD_INIT_STRATEGIES}; got {v_head_init_strategy!r}")
    if v_head_init_strategy == "normal" and not (  # the std of the kernel's normal init; TRL reads it only then
            isinstance(v_head_initializer_range, numbers.Real) and not isinstance(v_head_initializer_range, bool)
            and math.isfinite(v_head_initializer_range) and v_head_initializer_range >= 0):
        raise TrlaxError("v_head_initializer_range is the standard deviation of the normal init: a finite number "
                         f">= 0 (TRL's default 0.2); got {v_head_initializer_range!r}")
    dropout = getattr(config, "summary_dropout_prob", summary_dropout_prob)
    if dropout is not None and not (isinstance(dropout, numbers.Real) and 0 <= dropout <= 1):
        where = "the config's summary_dropout_prob" if hasattr(config, "summary_dropout_prob") else \
            "summary_dropout_prob"
        raise TrlaxError(f"{where} must be a probability in [0, 1] (0 or None: no dropout); got {dropout!r}")
    return ValueHead(value_head_hidden_size(config), dropout, v_head_init_strategy, v_head_initializer_range)


def init_value_head(head: ValueHead, rng: jax.Array) -> dict[str, Any]:
    """Fresh value-head params {"summary": {"kernel": [H, 1], "bias": [1]}} float32."""
    return head.init(rng, jnp.zeros((1, 1, head.hidden_size), jnp.float32))["params"]


@dataclass(frozen=True)
class RewardAdapter:
    """A reward adapter's name (TRL's `rm_adapter_name`) and PEFT config; its weights are `reward_params`."""

    name: str
    config: LoraConfig


def placed_head(v_head_params: dict[str, Any], lm: FlaxPreTrainedModel) -> dict[str, Any]:
    """A value head on the LM's devices: in its mesh layout (a no-op if it already has it), or device
    arrays as the LM's are (a head converted from torch arrives as numpy)."""
    if lm.mesh is not None:
        return shard_params({"v_head": v_head_params}, lm.mesh, lm.sharding_rules)["v_head"]
    return jax.tree_util.tree_map(jnp.asarray, v_head_params)


def _hub_options(model_args: dict[str, Any]) -> HubOptions:
    return HubOptions(model_args.get("revision"), model_args.get("token"), model_args.get("cache_dir"),
                      bool(model_args.get("local_files_only", False)))


class PreTrainedModelWrapper(RebuildsCompiled):
    """Base of the value-head wrappers: a trlax LM plus a value head, one param pytree.

    `params` is `{"pretrained_model": ..., "v_head": ...}` (plus `"lora"` for a LoRA
    policy) and is the one place the weights live: `pretrained_model` is a view of
    `params["pretrained_model"]`, so assigning `params` (e.g. after a donated train step)
    updates every method, the LM's own forward and generation included. `trainable_mask`
    (same structure, bools) says what an optimizer may update; `apply` is the pure forward
    a jitted train step uses. Build one with `from_pretrained`, or from its parts:

    - pretrained_model: a trlax LM (`FlaxAutoModelForCausalLM` / `...Seq2SeqLM` instance);
    - v_head_params: {"summary": {"kernel": [H, 1], "bias": [1]}}, or None for a new head
      (TRL's init from `seed`);
    - summary_dropout_prob, v_head_initializer_range, v_head_init_strategy: TRL's head options;
    - frozen: a reference model: its forward stops gradients and nothing is trainable;
    - policy_adapter: a LoRA policy (`trlax.peft.policy.PolicyAdapter`): the base is frozen,
      the adapter in `params["lora"]`;
    - reward_adapter, reward_params: a reward adapter's name/config and its weights, kept
      outside `params` (see `compute_reward_score`).
    """

    # TRL's name for the class that loads the LM (here trlax's Flax auto class).
    transformers_parent_class: ClassVar[type[AutoModel]] = FlaxAutoModelForCausalLM
    # TRL's names of the modules a wrapper adds (the value head) and of a reward adapter's head.
    supported_modules: ClassVar[tuple[str, ...]] = ("v_head",)
    supported_rm_modules: ClassVar[tuple[str, ...]] = (SCORE_MODULE,)
    # TRL reads these from the torch model it wraps; trlax refuses quantised loading and never offloads the head.
    is_loaded_in_8bit: ClassVar[bool] = False
    is_loaded_in_4bit: ClassVar[bool] = False
    is_sequential_parallel: ClassVar[bool] = False
    # `apply` arguments the jitted forward compiles a program per value of.
    static_forward_arguments: ClassVar[tuple[str, ...]] = ("train", "output_hidden_states")
    compiled_attributes: ClassVar[tuple[str, ...]] = (
        "_forward", "_reward_forward", "_check_head_params", "_check_lora_params")
    supported_args: ClassVar[tuple[str, ...]] = (
        "summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
    model_args: ClassVar[tuple[str, ...]] = (
        "dtype", "param_dtype", "revision", "token", "cache_dir", "local_files_only", "config", "place", "mesh",
        "sharding_rules")

    def __init__(
        self,
        pretrained_model: FlaxPreTrainedModel,
        v_head_params: dict[str, Any] | None = None,
        *,
        summary_dropout_prob: float | None = 0.1,
        v_head_initializer_range: float = 0.2,
        v_head_init_strategy: str | None = None,
        seed: int = 0,
        frozen: bool = False,
        policy_adapter: PolicyAdapter | None = None,
        reward_adapter: RewardAdapter | None = None,
        reward_params: dict[str, Any] | None = None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        refuse_base_class(type(self))
        if not isinstance(pretrained_model, FlaxPreTrainedModel):
            raise TrlaxTypeError(f"{type(self).__name__}(...) wraps a trlax LM; got {type(pretrained_model).__name__}. "
                                 f"For a transformers or TRL model, a folder or a hub id use "
                                 f"{type(self).__name__}.from_pretrained(...), which converts or loads it")
        if pretrained_model.is_encoder_decoder != self.transformers_parent_class.model_class.is_encoder_decoder:
            raise TrlaxTypeError(f"{type(self).__name__} cannot wrap a {type(pretrained_model).__name__}")
        if (reward_adapter is None) != (reward_params is None):
            raise TrlaxError("pass reward_adapter and reward_params together")
        self.config = pretrained_model.config
        self.v_head = make_value_head(self.config, summary_dropout_prob, v_head_initializer_range,
                                      v_head_init_strategy)
        if v_head_params is None:
            v_head_params = self.init_v_head(jax.random.key(seed))
        else:
            self._check_v_head(v_head_params)
        params: dict[str, Any] = {"pretrained_model": pretrained_model.params}
        if policy_adapter is not None:
            params[LORA_COLLECTION] = policy_adapter.lora
        params["v_head"] = placed_head(v_head_params, pretrained_model)
        self.params: dict[str, Any] = params
        self.pretrained_model = pretrained_model.view_for(self)
        self._frozen = frozen
        # A LoRA policy's config (its own copy) and whether its adapter trains; the weights live in params.
        self._lora_config = None if policy_adapter is None else copy.deepcopy(policy_adapter.config)
        self._lora_trainable = policy_adapter is not None and policy_adapter.trainable
        self.reward_adapter = reward_adapter
        # Outside `params`, so policy gradients never see them.
        self.reward_params: dict[str, Any] | None = reward_params
        self.base_model_name_or_path: str | None = (
            base_model_name_or_path or getattr(self.config, "name_or_path", None) or None)
        self.trainable_mask: dict[str, Any] = self._initial_trainable_mask()
        # The adapter's structure is the one it was built with (shapes only: no arrays kept alive).
        self._lora_structure = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                      self.params.get(LORA_COLLECTION))
        self.build_compiled()

    def build_compiled(self) -> None:
        """The jitted forward and reward forward and the head and adapter checks, bound to this object."""
        head, lora = self.v_head, self._lora_structure
        self._check_head_params = ParamsCheck(lambda: jax.eval_shape(lambda: init_value_head(head, jax.random.key(0))),
                                              "this model's value head")
        self._check_lora_params = ParamsCheck(lambda: lora, "this policy's LoRA adapter")
        what = f"this {type(self).__name__}"
        self._forward = jit_forward(self.apply, self.static_forward_arguments, self.trace_settings, what)
        self._reward_forward = with_live_params(jax.jit(self.apply_reward), what)

    def _initial_trainable_mask(self) -> dict[str, Any]:
        """Everything (a full policy), nothing (a reference), or a LoRA policy's adapter and value head."""
        mask = jax.tree_util.tree_map(lambda _: not self.frozen, self.params)
        if self.is_peft_model and not self.frozen:
            mask["pretrained_model"] = jax.tree_util.tree_map(lambda _: False, self.params["pretrained_model"])
            mask[LORA_COLLECTION] = trainable_lora_mask(self.params[LORA_COLLECTION], self._lora_trainable)
        return mask

    # --- what this wrapper is -------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """A reference model: the forward applies `jax.lax.stop_gradient` to its params."""
        return self._frozen

    @property
    def is_peft_model(self) -> bool:
        """A LoRA policy: frozen base plus a trainable adapter in `params["lora"]` (TRL's name)."""
        return self._lora_config is not None

    @property
    def policy_adapter_name(self) -> str:
        """TRL's name of the policy adapter ("default")."""
        return POLICY_ADAPTER_NAME

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> its LoraConfig (a new dict each time: the policy's and the reward adapter's)."""
        configs = {} if self._lora_config is None else {POLICY_ADAPTER_NAME: self._lora_config}
        if self.reward_adapter is not None:
            configs[self.reward_adapter.name] = self.reward_adapter.config
        return configs

    @property
    def lora_dropout(self) -> float:
        """PEFT's lora_dropout of the policy adapter (`peft_config["default"].lora_dropout`, which may be changed),
        applied by forwards with `train=True` to the input of its LoRA branches; 0.0 without a policy adapter."""
        return 0.0 if self._lora_config is None else self._lora_config.lora_dropout

    def trace_settings(self) -> tuple[Any, ...]:
        """The settings a traced forward reads, which key the jitted forward's programs: the LM's (see
        `FlaxPreTrainedModel.trace_settings`) and the policy adapter's `lora_dropout`."""
        return self.pretrained_model.trace_settings(), self.lora_dropout

    @property
    def supports_rm_adapter(self) -> bool:
        """Whether a reward adapter is loaded (TRL's attribute)."""
        return self.reward_adapter is not None

    @property
    def rm_adapter_name(self) -> str | None:
        """The reward adapter's name, or None without one (TRL's attribute)."""
        return None if self.reward_adapter is None else self.reward_adapter.name

    def policy_adapter(self, params: dict[str, Any] | None = None) -> PolicyAdapter | None:
        """A LoRA policy's adapter (config, the weights in `params`, trainable or not); None otherwise."""
        if self._lora_config is None:
            return None
        return PolicyAdapter(self._lora_config, self.adapter_weights(self.params if params is None else params,
                                                                     "policy_adapter"), self._lora_trainable)

    def adapter_weights(self, params: dict[str, Any], what: str) -> dict[str, Any]:
        """A LoRA policy's adapter tree in `params` (TrlaxError naming `what` when they hold the base alone)."""
        if LORA_COLLECTION not in params:
            raise TrlaxError(f"{what}: these params hold no 'lora' adapter (the base alone, e.g. the reference's), "
                             "and this LoRA policy's checkpoint is its adapter; pass params with the adapter, or use "
                             "model.pretrained_model's save_pretrained / to_torch with params['pretrained_model'] for "
                             "the base model alone")
        return params[LORA_COLLECTION]

    def head_options(self) -> dict[str, Any]:
        """The value-head keyword arguments this wrapper was built with (for building its likes)."""
        return {"summary_dropout_prob": self.v_head.dropout_prob, "v_head_init_strategy": self.v_head.init_strategy,
                "v_head_initializer_range": self.v_head.initializer_range}

    # --- transformers' training switches, as TRL copies them from the wrapped model ---------
    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the LM's blocks are rematerialised in the backward pass (see `gradient_checkpointing_enable`)."""
        return self.pretrained_model.is_gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The LM's `gradient_checkpointing_enable` (kwargs accepted and ignored): `apply`, so a train step's
        gradient, and the jitted forward rematerialise each block of the LM in the backward pass."""
        self.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """The LM's `gradient_checkpointing_disable`: blocks keep their activations (the default)."""
        self.pretrained_model.gradient_checkpointing_disable()

    def eval(self) -> PreTrainedModelWrapper:
        """transformers' `eval()`: returns this wrapper unchanged (calls run without dropout unless
        `train=True, dropout_rng=key` is passed)."""
        return self

    def train(self, mode: bool = True) -> PreTrainedModelWrapper:
        """transformers' `train()`: `train(False)` is `eval()`; `train(True)` raises TrlaxTypeError (dropout is
        chosen per call: `train=True, dropout_rng=key`)."""
        refuse_train_mode(mode)
        return self.eval()

    # --- value head ---------------------------------------------------------------------
    def init_v_head(self, rng: jax.Array) -> dict[str, Any]:
        """Fresh value-head params {"summary": {"kernel": [H, 1], "bias": [1]}} float32."""
        return init_value_head(self.v_head, rng)

    def _check_v_head(self, v_head_params: dict[str, Any]) -> None:
        want = (self.v_head.hidden_size, 1)
        got = tuple(np.shape(v_head_params["summary"]["kernel"]))
        if got != want:
            raise CheckpointError(f"value head kernel has shape {got}, but the model's hidden size needs {want} "
                                  f"(v_head.summary.weight [1, {want[0]}])")

    def post_init(self, state_dict: Mapping[str, Any]) -> None:
        """TRL's value-head restore from a state dict (numpy arrays or torch tensors).

        Entries whose key contains `v_head.` (`v_head.summary.weight` [1, H], `v_head.summary.bias`
        [1]) replace the head's params, as float32; other entries are ignored and a missing one keeps
        its current value, as TRL's `load_state_dict(strict=False)` does. A shape that does not fit
        the head raises CheckpointError (TRL: a size-mismatch error) and changes nothing.
        """
        head = {key.replace(V_HEAD_PREFIX, ""): value for key, value in state_dict.items() if V_HEAD_PREFIX in key}
        summary = dict(self.params["v_head"]["summary"])
        for key, leaf in (("summary.weight", "kernel"), ("summary.bias", "bias")):
            if key not in head:
                continue
            stored = tensor_to_numpy(head[key]) if is_torch_tensor(head[key]) else np.asarray(head[key])
            want = tuple(summary[leaf].shape[::-1] if leaf == "kernel" else summary[leaf].shape)  # torch layout
            if stored.shape != want:
                raise CheckpointError(f"v_head.{key} has shape {stored.shape}, but this model's value head takes "
                                      f"{want}")
            summary[leaf] = (stored.T if leaf == "kernel" else stored).astype(np.float32)
        self.params = {**self.params, "v_head": placed_head({"summary": summary}, self.pretrained_model)}

    def check_params(self, params: dict[str, Any]) -> None:
        """InputError unless `params` has this wrapper's structure: {"pretrained_model": the LM's params,
        "v_head": the head's, and for a LoRA policy optionally "lora" (without it: the base alone)}, every
        shape as the model's. Cheap when repeated (see `trlax.inputs.ParamsCheck`); under jit it runs
        once per trace."""
        want = {"pretrained_model", "v_head"}
        allowed = want | ({LORA_COLLECTION} if self.is_peft_model else set())
        got = set(params) if isinstance(params, dict) else set()
        if not want <= got <= allowed:
            problem = f"has no {sorted(want - got)}" if want - got else f"has unexpected {sorted(got - allowed)}"
            raise InputError(f"params {problem}: a {type(self).__name__} takes {{{', '.join(sorted(allowed))}}}; "
                             "pass this wrapper's params (model.params), not the LM's alone")
        self.pretrained_model.check_params(params["pretrained_model"], "params['pretrained_model']")
        self._check_head_params(params["v_head"], "params['v_head']")
        if LORA_COLLECTION in params:
            self._check_lora_params(params[LORA_COLLECTION], "params['lora']")

    @property
    def v_head_dropout_prob(self) -> float | None:
        """The value head's dropout probability (TRL's `summary_dropout_prob`), or None for no dropout layer."""
        return self.v_head.dropout_prob

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def _split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        kwargs = translate_loading_args(kwargs, f"{cls.__name__}.from_pretrained")
        if kwargs.get("dtype", 0) is None:
            kwargs.pop("dtype")
        trl_args = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.supported_args}
        model_args = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_args}
        if kwargs:
            raise TrlaxTypeError(
                f"{cls.__name__}.from_pretrained got unknown keyword argument(s) {sorted(kwargs)}; "
                f"value-head arguments: {list(cls.supported_args)}; model arguments: {list(cls.model_args)}"
            )
        return trl_args, model_args

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | FlaxPreTrainedModel,
        *,
        strict: bool = False,
        seed: int = 0,
        peft_config: Any = None,
        reward_adapter: str | os.PathLike | None = None,
        reward_adapter_name: str = DEFAULT_REWARD_ADAPTER_NAME,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModelWrapper:
        """Wrap a trlax LM with a value head: from a folder, a hub id, or a model instance.

        A checkpoint holding TRL's `v_head.summary.*` keys (single file, sharded index or
        .bin) restores the head; otherwise it is initialised (from `seed`) with a warning,
        or an error when `strict=True`. Keyword arguments: TRL's
        `summary_dropout_prob`, `v_head_initializer_range`, `v_head_init_strategy`, and
        the LM's `dtype`, `param_dtype`, `revision`, `token`, `cache_dir`,
        `local_files_only`, `config`, `mesh`, `sharding_rules` (sharded loading, see
        `FlaxPreTrainedModel.from_pretrained`); anything else is an error.

        LoRA (TRL's PEFT arguments, see `trlax.peft`): `peft_config` (`trlax.LoraConfig`, a
        dict of PEFT LoraConfig fields, or a `peft.LoraConfig`) adds a trainable policy
        adapter on the frozen base; a folder or hub id holding a PEFT adapter_config.json
        loads that adapter policy (its base from `base_model_name_or_path`, trainable only
        with `is_trainable=True`, `peft_config` then ignored); `reward_adapter` (folder or
        hub id of a PEFT SEQ_CLS LoRA adapter with its `score` head) loads a reward adapter
        under `reward_adapter_name` for `compute_reward_score`; it needs a LoRA policy, as in TRL. A TRL model
        passed in memory brings its reward adapter (under its own name), unless `reward_adapter` is given.
        """
        refuse_base_class(cls)
        trl_args, model_args = cls._split_kwargs(dict(kwargs))
        if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
            raise TrlaxError(f"reward_adapter must be a local folder or a hub id; got {type(reward_adapter).__name__}")
        if reward_adapter is not None and reward_adapter_name == POLICY_ADAPTER_NAME:
            raise TrlaxError(f"reward_adapter_name {reward_adapter_name!r} is the policy adapter's name (in TRL, PEFT "
                             "would load the reward adapter over the policy's); pick another, e.g. the default "
                             f"{DEFAULT_REWARD_ADAPTER_NAME!r}")
        source = pretrained_model_name_or_path
        options = _hub_options(model_args)
        adapter: PolicyAdapter | None = None
        base_name: str | None = None
        part_of_head: dict[str, Any] = {}  # a saved head's tensors when only some are stored (TRL's layout)
        carried_reward: tuple[str, AdapterFiles] | None = None  # a TRL model's reward adapter (name, as read)
        if is_torch_model(source):
            if set(model_args) - {"dtype", "param_dtype", "mesh", "sharding_rules"}:
                raise TrlaxTypeError(f"model arguments {sorted(model_args)} only apply when loading from a path or "
                                     "hub id")
            parts = torch_parts(source)
            lm = cls.transformers_parent_class.model_class.from_parts(parts, type(source).__name__, **model_args)
            v_head, base_name = parts.v_head, parts.name
            if parts.v_head_dropout is not None:  # the TRL model's dropout, unless the call names one
                trl_args.setdefault("summary_dropout_prob", parts.v_head_dropout)
            if parts.reward_adapter_name is not None and reward_adapter is None:  # the call's, if any, wins
                carried_reward = reward_adapter_from_torch(parts)
            if parts.adapter_state is not None:
                adapter = _adapter_from_torch(parts, lm, is_trainable)
                if peft_config is not None:
                    logger.warning("the PEFT model brings its adapter; the peft_config argument is ignored")
            if v_head is None:
                _missing_head(f"{type(source).__name__} has no value head", strict)
        elif isinstance(source, FlaxPreTrainedModel):
            if model_args:
                raise TrlaxTypeError(f"model arguments {sorted(model_args)} only apply when loading from a path or "
                                     "hub id")
            if source.is_encoder_decoder != cls.transformers_parent_class.model_class.is_encoder_decoder:
                raise TrlaxTypeError(f"{cls.__name__} cannot wrap a {type(source).__name__}")
            lm, v_head = source, None
        elif not isinstance(source, (str, os.PathLike)):
            raise TrlaxTypeError(f"pretrained_model_name_or_path must be a path, a hub id or a trlax model; "
                            f"got {type(source).__name__}")
        elif is_adapter_folder(source, options):
            if peft_config is not None:
                logger.warning("%s holds a PEFT adapter; the peft_config argument is ignored (as TRL does)", source)
            saved = load_adapter_policy(cls.transformers_parent_class, source, options, model_args,
                                        is_trainable=is_trainable)
            lm, adapter, base_name = saved.base, saved.adapter, saved.base_name
            missing = [key for key in VALUE_HEAD_KEYS if key not in saved.v_head_state]
            v_head = None if missing else {"summary": {
                "kernel": jnp.asarray(saved.v_head_state["v_head.summary.weight"].T, jnp.float32),
                "bias": jnp.asarray(saved.v_head_state["v_head.summary.bias"], jnp.float32)}}
            if not saved.v_head_state:
                _missing_head(f"{source} has no value head (v_head.summary.* in model.safetensors or "
                              "pytorch_model.bin)", strict)
            elif missing:
                _part_of_head_missing(f"{source} has only part of a value head (no {', '.join(missing)})", strict)
                part_of_head = saved.v_head_state
        else:
            lm, v_head = cls._load(source, strict=strict, seed=seed, trl_args=trl_args, **model_args)
            base_name = str(source)
        if peft_config is not None and adapter is None:
            adapter = new_policy_adapter(peft_config, lm, seed)
        reward = reward_params = None
        if reward_adapter is not None or carried_reward is not None:
            if adapter is None:
                raise TrlaxError("reward_adapter can only be used with a LoRA policy (pass peft_config=... or load a "
                                 "saved adapter policy): the reward adapter scores on the frozen base, which a fully "
                                 "trained policy would change")
            hidden = value_head_hidden_size(lm.config)
            reward_base = base_name or lm.config.name_or_path or None
            if carried_reward is not None:
                reward_adapter_name, files = carried_reward
                reward_config, reward_params = reward_adapter_from(lm, files, hidden, base_name=reward_base)
            else:
                reward_config, reward_params = load_reward_adapter(
                    lm, str(reward_adapter), hidden, base_name=reward_base,
                    options=replace(options, revision=None))  # revision= is the policy's; TRL passes the token only
            reward = RewardAdapter(reward_adapter_name, reward_config)
        if lm.mesh is not None:  # adapters join the mesh layout of the base they adapt
            if adapter is not None:
                adapter = PolicyAdapter(adapter.config, shard_params(adapter.lora, lm.mesh, lm.sharding_rules),
                                        adapter.trainable)
            if reward_params is not None:
                reward_params = shard_params(reward_params, lm.mesh, lm.sharding_rules)
        model = cls(lm, v_head_params=v_head, seed=seed, policy_adapter=adapter, reward_adapter=reward,
                    reward_params=reward_params, base_model_name_or_path=base_name, **trl_args)
        if part_of_head:
            model.post_init(part_of_head)  # over the head initialised from `seed`
        return model

    @classmethod
    def _load(cls, source: str | os.PathLike, *, strict: bool, seed: int, trl_args: dict[str, Any],
              dtype: Any = None, param_dtype: Any = jnp.float32, revision: str | None = None,
              token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
              local_files_only: bool = False, config: transformers.PretrainedConfig | None = None,
              place: Any = None, mesh: Mesh | None = None,
              sharding_rules: Any = None) -> tuple[FlaxPreTrainedModel, dict[str, Any] | None]:
        """(the LM, the value head or None) from a TRL or transformers checkpoint, read in one pass."""
        dtype = jnp.float32 if dtype is None else dtype
        options = HubOptions(revision, token, cache_dir, local_files_only)
        resolved = resolve_checkpoint(source, options, require_config=config is None)
        config = config or load_config(resolved.folder, resolved.source)
        with CheckpointReader(list(resolved.weight_files)) as reader:
            stored = stored_float_dtype(reader)
            auto = auto_dtype(config, stored)
            model = cls.transformers_parent_class.model_class(config, dtype=resolve_dtype(dtype, auto),
                                               param_dtype=resolve_dtype(param_dtype, auto), mesh=mesh,
                                               sharding_rules=sharding_rules)
            head = make_value_head(config, **trl_args)
            table = model.key_table(path_prefix=("pretrained_model",))
            table.update(key_table(jax.eval_shape(lambda: init_value_head(head, jax.random.key(0))),
                                   prefix=V_HEAD_PREFIX, path_prefix=("v_head",)))
            params, report = model.load_checkpoint(reader, resolved.source, table,
                                                   model.ignored_checkpoint_keys(value_head=False),
                                                   optional_prefixes=(V_HEAD_PREFIX,), place=model.placer(place))
        model.params = params["pretrained_model"]
        model.storage_dtype = stored
        model.generation_config = read_generation_config(source, options)
        missing = sorted(report.missing_optional)
        if len(missing) == sum(key.startswith(V_HEAD_PREFIX) for key in table):
            _missing_head(f"{resolved.source} has no value head ({', '.join(missing)})", strict)
            return model, None
        if missing:  # part of a head: TRL keeps the stored part and initialises the rest
            _part_of_head_missing(f"{resolved.source} has only part of a value head (no {', '.join(missing)})",
                                  strict)
            fresh = {"v_head": init_value_head(head, jax.random.key(seed))}
            for key in missing:
                set_path(params, table[key].path, get_path(fresh, table[key].path))
        return model, params["v_head"]

    # --- forward ------------------------------------------------------------------------
    def lm_and_values(self, params: dict[str, Any], lm_inputs: tuple[Any, ...], *, dropout_rng: jax.Array | None,
                      train: bool, labels: jax.Array | None, check_inputs: bool, past_key_values: Any,
                      return_past_key_values: bool) -> tuple[jax.Array, ...]:
        """TRL's forward, pure: the LM's `apply` on `lm_inputs` (its positional inputs after params), then the
        value head on its last hidden state [B, T, H]. Returns (lm_logits [B, T, V] float32, loss [] float32 or
        None, values [B, T] float32), plus the LM's cache with `return_past_key_values`. A frozen wrapper (a
        reference) stops gradients through its params; `train=True` splits `dropout_rng` between LM and head, and
        applies the policy adapter's `lora_dropout` (read when traced) to its LoRA branches."""
        self.check_params(params)
        if self.frozen:
            params = jax.lax.stop_gradient(params)
        lm_rng = head_rng = None
        if train:
            check_dropout_rng(train, dropout_rng)
            lm_rng, head_rng = jax.random.split(dropout_rng)
        out = self.pretrained_model.apply(params["pretrained_model"], *lm_inputs, dropout_rng=lm_rng, train=train,
                                          lora=params.get(LORA_COLLECTION), lora_dropout=self.lora_dropout,
                                          labels=labels, check_inputs=check_inputs,
                                          past_key_values=past_key_values, use_cache=return_past_key_values)
        values = self.v_head.apply({"params": params["v_head"]}, out.last_hidden_state, deterministic=not train,
                                   rngs={"dropout": head_rng} if train else None)
        outputs = (out.logits.astype(jnp.float32), out.loss, values)
        return (*outputs, out.cache) if return_past_key_values else outputs

    # --- reward adapter -----------------------------------------------------------------
    def apply_reward(self, params: dict[str, Any], reward_params: dict[str, Any], input_ids: jax.Array,
                     attention_mask: jax.Array, position_ids: jax.Array | None = None) -> jax.Array:
        """Pure reward forward: scores [B, T, num_labels] float32 of the base in `params` with
        the reward adapter and score head in `reward_params` (no gradients flow through)."""
        return reward_scores(self.pretrained_model, params["pretrained_model"], reward_params, input_ids,
                             attention_mask, position_ids)

    def compute_reward_score(self, input_ids: Any, attention_mask: Any = None, params: dict[str, Any] | None = None,
                             reward_params: dict[str, Any] | None = None, position_ids: Any = None) -> jax.Array:
        """TRL's per-token reward scores [B, T, num_labels] float32 from the reward adapter, jitted.

        input_ids [B, T] int; attention_mask [B, T] (default all ones); params: the
        policy's (default `self.params`; only its frozen base is used); reward_params:
        default `self.reward_params`. Pick the last real token's row for a sequence reward.
        """
        if not self.supports_rm_adapter:
            raise TrlaxError("This model does not support reward modeling adapter: load one with "
                             "from_pretrained(..., peft_config=..., reward_adapter=<PEFT reward adapter>)")
        input_ids = token_ids("input_ids", input_ids)
        mask = mask_for("attention_mask", attention_mask, input_ids)
        if position_ids is not None:
            position_ids = same_shape("position_ids", position_ids, input_ids.shape)
        self.pretrained_model.check_inputs(input_ids, mask, position_ids)
        return self._reward_forward(self.params if params is None else params,
                                    self.reward_params if reward_params is None else reward_params,
                                    input_ids, mask, position_ids)

    # --- saving -------------------------------------------------------------------------
    def value_head_state(self, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """TRL's value-head tensors: `v_head.summary.weight` [1, H] and `v_head.summary.bias` [1]."""
        summary = (self.params if params is None else params)["v_head"]["summary"]
        instead = "model.save_pretrained(folder), called on every process, which gathers one tensor at a time"
        return {"v_head.summary.weight": np.ascontiguousarray(host_array(summary["kernel"], instead=instead).T),
                "v_head.summary.bias": host_array(summary["bias"], instead=instead)}

    def state_dict(self, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """TRL's layout: the LM's transformers keys plus `v_head.summary.weight` [1, H] / `.bias` [1].
        For an adapter policy only the value head's keys, as TRL (the adapter is saved by PEFT's rules)."""
        params = self.params if params is None else params
        if self.is_peft_model:
            return self.value_head_state(params)
        return {**self.pretrained_model.state_dict(params["pretrained_model"]), **self.value_head_state(params)}

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict[str, Any] | None = None,
                        max_shard_size: int | str | None = None, dtype: Any = None,
                        **transformers_args: Any) -> list[Path]:
        """config.json + model.safetensors (or shards) as TRL writes them; loads in TRL and transformers.

        The LM's floats are written in `dtype` (default: the dtype of the checkpoint it was
        loaded from, else its params'), which config.json states; TRL's value head stays
        float32, as TRL saves it. Params sharded over several processes: call it on every
        process (process 0 writes, tensors gathered one at a time, see
        `trlax.checkpoint.gather`). An adapter policy writes PEFT's adapter files plus its
        value head instead (see `trlax.peft.policy.write_adapter_policy`; no `max_shard_size` or
        `dtype` there: TrlaxTypeError). transformers' saving
        keywords: `trlax.checkpoint.saving_args` (safe_serialization=True is accepted).
        """
        check_saving_args(transformers_args, f"{type(self).__name__}.save_pretrained")
        params = self.params if params is None else params
        self.check_params(params)
        if self.is_peft_model:
            for name, value in (("max_shard_size", max_shard_size), ("dtype", dtype)):
                if value is not None:  # PEFT's layout: one adapter file, the adapter as it is held
                    raise TrlaxTypeError(f"an adapter policy saves PEFT's one adapter file (the adapter in the dtype "
                                         f"it is held in) and TRL's value head: save_pretrained takes no {name} here")
            # The adapter and the head are small: gathered whole (on every process) if sharded.
            small = host_tree({"lora": self.adapter_weights(params, "save_pretrained"), "v_head": params["v_head"]})
            return on_writer_process(
                lambda: write_adapter_policy(save_directory, self.pretrained_model, self._lora_config, small["lora"],
                                             self.value_head_state(small), base_name=self.base_model_name_or_path),
                str(save_directory))
        lm = self.pretrained_model
        dtype = lm.save_dtype(params["pretrained_model"], dtype)
        tensors = lm.tensors_to_save(params, dtype, path_prefix=("pretrained_model",))
        tensors.update(checkpoint_tensors(params, key_table(params["v_head"], prefix=V_HEAD_PREFIX,
                                                            path_prefix=("v_head",))))
        written = write_checkpoint(save_directory, tensors, write_extra=lambda tmp: lm.write_config_files(tmp, dtype),
                                   max_shard_size=max_shard_size)
        if any(path.name == SAFE_WEIGHTS_INDEX_NAME for path in written):
            logger.warning("%s is sharded: transformers and trlax load it, but TRL 1.12's from_pretrained cannot (it "
                           "asks the hub for a local folder's shards: HFValidationError); save without "
                           "max_shard_size for TRL", save_directory)
        return written

    def push_to_hub(self, repo_id: str, *, params: dict[str, Any] | None = None,
                    max_shard_size: int | str | None = None, dtype: Any = None, **hub_args: Any) -> Any:
        """Upload what save_pretrained(max_shard_size=, dtype=) writes; `hub_args` go to
        `trlax.checkpoint.push.push_to_hub` (commit_message, commit_description, private, token,
        revision, create_pr, tags)."""
        return push_to_hub(lambda folder: self.save_pretrained(folder, params=params, max_shard_size=max_shard_size,
                                                               dtype=dtype), repo_id, **hub_args)

    def to_torch(self, params: dict[str, Any] | None = None, dtype: Any = None) -> Any:
        """TRL's PyTorch value-head model (`trl.experimental.ppo`) with these weights, in memory (a reward
        adapter too: the PeftModel's adapter and the `score` head, as TRL's `from_pretrained(reward_adapter=...)`).

        The LM is the transformers model `pretrained_model.to_torch` gives (a LoRA policy's:
        a PEFT PeftModel holding the adapter); the value head is float32 as in TRL. Needs
        torch and trl (and peft for a LoRA policy).
        """
        params = self.params if params is None else params
        lora = self.adapter_weights(params, "to_torch") if self.is_peft_model else None
        lm = self.pretrained_model.to_torch(params["pretrained_model"], dtype)
        if self.is_peft_model:
            config = self._lora_config.to_peft_dict()
            config.update(base_model_name_or_path=self.base_model_name_or_path, inference_mode=not self._lora_trainable,
                          task_type="SEQ_2_SEQ_LM" if self.pretrained_model.is_encoder_decoder else "CAUSAL_LM")
            lm = peft_lm(lm, config, peft_state_dict(lora, self.pretrained_model.config.model_type))
        head = {k.removeprefix(V_HEAD_PREFIX): v for k, v in self.value_head_state(params).items()}
        model = trl_value_head_model(lm, head, self.pretrained_model.is_encoder_decoder, self.head_options())
        if self.reward_adapter is not None:
            config = self.reward_adapter.config.to_peft_dict()
            config.update(base_model_name_or_path=self.base_model_name_or_path, inference_mode=True)
            score = self.reward_params[SCORE_MODULE]
            add_reward_adapter(model, self.reward_adapter.name, config,
                               peft_state_dict(self.reward_params["lora"], self.pretrained_model.config.model_type),
                               {"weight": np.asarray(score["kernel"], np.float32).T,
                                **({"bias": np.asarray(score["bias"], np.float32)} if "bias" in score else {})})
        return model

    def generate(self, *args: Any, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Generation with the LM's params and, for a LoRA policy, its adapter (values are not
        computed), as TRL delegates it."""
        params = self.params if params is None else params
        self.check_params(params)
        return self.pretrained_model.generate(*args, params=params["pretrained_model"],
                                              lora=params.get(LORA_COLLECTION), **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pretrained_model!r}, frozen={self.frozen})"


def reward_adapter_from_torch(parts: TorchParts) -> tuple[str, AdapterFiles]:
    """A TRL model's reward adapter as read from a folder: (its name, its config and PEFT-keyed tensors, the
    `score` head's under `base_model.model.score.*` as PEFT saves them)."""
    score = {f"{PEFT_PREFIX}{SCORE_MODULE}.{key}": value for key, value in (parts.reward_score or {}).items()}
    name = parts.reward_adapter_name
    files = AdapterFiles(f"{name!r} of the TRL model", LoraConfig.from_peft(parts.reward_adapter_config),
                         {**(parts.reward_adapter_state or {}), **score})
    return name, files


def _adapter_from_torch(parts: TorchParts, lm: FlaxPreTrainedModel, is_trainable: bool) -> PolicyAdapter:
    """A PEFT model's active LoRA adapter as a policy adapter (trainable unless PEFT's inference mode)."""
    files = AdapterFiles("the PEFT model", LoraConfig.from_peft(parts.adapter_config), parts.adapter_state or {})
    lora, saved = lora_from_peft(files, lm.params, lm.config.model_type, base_name=parts.name)
    if saved:
        raise UnsupportedModelError(f"the PEFT model saves {sorted(saved)[:4]} in full (modules_to_save); trlax "
                                    "policy adapters support LoRA weights only")
    check_applied(lm, lora)
    return PolicyAdapter(files.config, lora, parts.adapter_trainable or is_trainable)


def refuse_tuple_lm_output(return_dict: bool | None) -> None:
    """TRL's forward passes `return_dict` to the LM and then reads `.hidden_states` of its output, so False
    fails there (AttributeError on a tuple); here it is refused by name. None and True change nothing."""
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TrlaxTypeError(f"return_dict must be a bool or None, got {type(return_dict).__name__}")
    if return_dict is False:
        raise TrlaxTypeError("return_dict=False: the value-head forward returns TRL's tuple (lm_logits, loss, values) "
                             "whatever return_dict is, and TRL's own forward fails with it (it reads the LM output's "
                             ".hidden_states); leave return_dict out")


def _part_of_head_missing(what: str, strict: bool) -> None:
    """TRL's head loads with `load_state_dict(strict=False)`: the stored part is kept and the rest initialised."""
    if strict:
        raise CheckpointError(f"{what} (strict=True)")
    logger.warning("%s; initialised the missing part and kept the stored one, as TRL does", what)


def _missing_head(what: str, strict: bool) -> None:
    if strict:
        raise CheckpointError(f"{what}, and strict=True refuses to initialise one (pass strict=False to start a new "
                              "value head, as TRL does)")
    logger.warning("%s; initialised a new one. This is expected unless you are resuming PPO training.", what)


class FlaxAutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A causal LM with TRL's value head: `model(ids, mask, labels=None) -> (lm_logits, loss, values)`."""

    transformers_parent_class = FlaxAutoModelForCausalLM
    static_forward_arguments = (*PreTrainedModelWrapper.static_forward_arguments, "return_past_key_values")

    def apply(
        self,
        params: dict[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array,
        position_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_hidden_states: bool = False,
        labels: jax.Array | None = None,
        check_inputs: bool = False,
        past_key_values: Any = None,
        return_past_key_values: bool = False,
    ) -> tuple[jax.Array, ...]:
        """Pure forward: (lm_logits [B, T, V] f32, loss [] f32 with labels [B, T] else None, values [B, T] f32),
        and the LM's KV cache after them with `return_past_key_values` (past_key_values: the LM's, see
        `__call__`). Checks params and inputs as the LM's `apply` (`check_inputs`: traced ones too, see
        `trlax.inputs`)."""
        return self.lm_and_values(params, (input_ids, attention_mask, position_ids), dropout_rng=dropout_rng,
                                  train=train, labels=labels, check_inputs=check_inputs,
                                  past_key_values=past_key_values, return_past_key_values=return_past_key_values)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: dict[str, Any] | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        labels: Any = None,
        check_inputs: bool = False,
        return_past_key_values: bool = False,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        **unsupported: Any,
    ) -> tuple[jax.Array, ...]:
        """TRL's 3-tuple (lm_logits [B, T, V] float32, loss, values [B, T] float32), jitted.

        input_ids [B, T] int; attention_mask [B, T] (default all ones); position_ids as
        the LM's forward; `train=True` with `dropout_rng` enables dropout. labels [B, T]
        int (-100 = ignored): loss is the wrapped LM's loss as TRL returns it
        (transformers' shifted cross-entropy, [] float32); None without labels. Bad ids,
        positions or params raise InputError as in the LM's forward.

        KV cache, as TRL's: `return_past_key_values=True` appends the LM's cache after these tokens
        (one {"k", "v"} [B, Hkv, P + T, D] per layer) as a 4th output; `past_key_values` (a cache
        returned so; or `cache=`, transformers 5.25's name, which TRL passes on) continues after its P
        tokens, attention_mask then [B, P + T]: see the LM's `__call__`. TRL's `use_cache` changes
        nothing (the cache is returned when asked for). `return_dict` None or True changes nothing either;
        False raises TrlaxTypeError, as TRL's forward fails on the LM's tuple output. `output_hidden_states`
        changes nothing (TRL's forward sets it itself and returns no hidden states). Other transformers
        arguments raise TrlaxTypeError.
        """
        refuse_tuple_lm_output(return_dict)
        refuse_unsupported_arguments(unsupported, f"{type(self).__name__}.__call__")
        past_key_values = kv_cache_argument(cache, past_key_values)
        input_ids = token_ids("input_ids", input_ids)
        past_length = self.pretrained_model.past_length(past_key_values, input_ids.shape[0])
        mask = mask_for("attention_mask", attention_mask, input_ids, past_length)
        if position_ids is not None:
            position_ids = same_shape("position_ids", position_ids, input_ids.shape)
        if labels is not None:
            labels = same_shape("labels", token_ids("labels", labels), input_ids.shape)
        self.pretrained_model.check_inputs(input_ids, mask, position_ids, labels, past_length=past_length,
                                           traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, position_ids,
                             dropout_rng, train=train, labels=labels, past_key_values=past_key_values,
                             return_past_key_values=return_past_key_values)


class FlaxAutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """An encoder-decoder LM with TRL's value head over the decoder positions."""

    transformers_parent_class = FlaxAutoModelForSeq2SeqLM
    # TRL sets it on its seq2seq wrapper only (TRL's trainers test `hasattr(model, "is_encoder_decoder")`).
    is_encoder_decoder: ClassVar[bool] = True
    # TRL's names of an LM head (its seq2seq wrapper checks the wrapped model for one).
    lm_head_namings: ClassVar[tuple[str, ...]] = ("lm_head", "embed_out", "output_projection")
    static_forward_arguments = (*PreTrainedModelWrapper.static_forward_arguments, "return_past_key_values")

    def apply(
        self,
        params: dict[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_hidden_states: bool = False,
        labels: jax.Array | None = None,
        check_inputs: bool = False,
        past_key_values: Any = None,
        return_past_key_values: bool = False,
    ) -> tuple[jax.Array, ...]:
        """Pure forward: (lm_logits [B, Td, V] f32, loss [] f32 with labels [B, Td] else None, values [B, Td] f32),
        and the decoder's KV cache with `return_past_key_values`; checks and cache as the causal one's."""
        return self.lm_and_values(params, (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask),
                                  dropout_rng=dropout_rng, train=train, labels=labels, check_inputs=check_inputs,
                                  past_key_values=past_key_values, return_past_key_values=return_past_key_values)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        params: dict[str, Any] | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
        labels: Any = None,
        check_inputs: bool = False,
        return_past_key_values: bool = False,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        **unsupported: Any,
    ) -> tuple[jax.Array, ...]:
        """TRL's 3-tuple over decoder positions. decoder_input_ids [B, Td], or labels [B, Td]
        (-100 = ignored) from which they are derived as transformers does (shifted right behind
        the decoder start token; BART without either: input_ids shifted so); with labels, loss is
        the decoder LM loss [] float32. KV cache as TRL's: `return_past_key_values=True` appends the
        decoder's cache as a 4th output, `past_key_values` (or `cache=`) continues it with the same
        encoder inputs (decoder_attention_mask then [B, P + Td]): see the seq2seq LM's `__call__`.
        TRL's `use_cache` changes nothing; `return_dict`, `output_hidden_states` and other arguments as the
        causal wrapper's."""
        refuse_tuple_lm_output(return_dict)
        refuse_unsupported_arguments(unsupported, f"{type(self).__name__}.__call__")
        past_key_values = kv_cache_argument(cache, past_key_values)
        input_ids = token_ids("input_ids", input_ids)
        labels = None if labels is None else token_ids("labels", labels)
        decoder_input_ids = self.pretrained_model.decoder_inputs(input_ids, decoder_input_ids, labels)
        past_length = self.pretrained_model.past_length(past_key_values, decoder_input_ids.shape[0])
        mask = mask_for("attention_mask", attention_mask, input_ids)
        dmask = mask_for("decoder_attention_mask", decoder_attention_mask, decoder_input_ids, past_length)
        self.pretrained_model.check_inputs(input_ids, mask, decoder_input_ids, dmask, labels, past_length=past_length,
                                           traced=check_inputs)
        return self._forward(self.params if params is None else params, input_ids, mask, decoder_input_ids, dmask,
                             dropout_rng, train=train, labels=labels, past_key_values=past_key_values,
                             return_past_key_values=return_past_key_values)


def refuse_base_class(cls: type[PreTrainedModelWrapper]) -> None:
    """The base class has no forward (TRL's cannot load weights either): build one of its subclasses."""
    if cls is PreTrainedModelWrapper:
        raise TrlaxTypeError("PreTrainedModelWrapper is the base class of the value-head models (as in TRL): use "
                             "FlaxAutoModelForCausalLMWithValueHead or FlaxAutoModelForSeq2SeqLMWithValueHead")


# TRL's names.
AutoModelForCausalLMWithValueHead = FlaxAutoModelForCausalLMWithValueHead
AutoModelForSeq2SeqLMWithValueHead = FlaxAutoModelForSeq2SeqLMWithValueHead
