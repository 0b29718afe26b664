"""TRL's value head and the `*WithValueHead` wrappers, as pure functions over one param pytree.

The wrapper's params are `{"pretrained_model": <LM params>, "v_head": {"summary":
{"kernel": [H, 1], "bias": [1]}}}`; saved checkpoints hold the LM's transformers keys plus
TRL's `v_head.summary.weight` [1, H] / `v_head.summary.bias` [1], in the same files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh

from trlax import adapter_models
from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.naming import key_table
from trlax.checkpoint.writer import write_checkpoint_dir
from trlax.errors import CheckpointError
from trlax.models.auto import FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM
from trlax.models.base import FlaxPreTrainedModel, check_integer_ids, check_mask, load_config
from trlax.models.layers import torch_linear_init
from trlax.reward import reward_scores
from trlax.sharding import shard_model, shard_params

logger = logging.getLogger("trlax")

V_HEAD_PREFIX = "v_head."
V_HEAD_INIT_STRATEGIES = (None, "normal")


def value_head_hidden_size(config: transformers.PretrainedConfig) -> int:
    """Width of the LM head's input, looked up as TRL does.

    `word_embed_proj_dim` (OPT-350m projects before the head), then `hidden_size`, then
    `text_config.hidden_size` (multimodal), then `decoder.hidden_size` (encoder-decoder).
    """
    for source in (config, getattr(config, "text_config", None)):
        for name in ("word_embed_proj_dim", "hidden_size"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                return value
            if source is not config:
                break
    decoder = getattr(config, "decoder", None)
    if getattr(config, "is_encoder_decoder", False) and isinstance(getattr(decoder, "hidden_size", None), int):
        return decoder.hidden_size
    raise ValueError(
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
        raise ValueError(f"v_head_init_strategy must be one of {V_HEAD_INIT_STRATEGIES}; got {v_head_init_strategy!r}")
    dropout = getattr(config, "summary_dropout_prob", summary_dropout_prob)
    return ValueHead(value_head_hidden_size(config), dropout, v_head_init_strategy, v_head_initializer_range)


def init_value_head(head: ValueHead, rng: jax.Array) -> dict[str, Any]:
    """Fresh value-head params {"summary": {"kernel": [H, 1], "bias": [1]}} float32."""
    return head.init(rng, jnp.zeros((1, 1, head.hidden_size), jnp.float32))["params"]


class PreTrainedModelWrapper:
    """Base of the value-head wrappers: a trlax LM plus a value head, one param pytree.

    `params` is `{"pretrained_model": ..., "v_head": ...}`; `trainable_mask` (same
    structure, bools) says what an optimizer may update; `apply` is the pure forward a
    jitted train step uses.
    """

    auto_class: ClassVar[Any] = FlaxAutoModelForCausalLM
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
    ) -> None:
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.v_head = make_value_head(self.config, summary_dropout_prob, v_head_initializer_range,
                                      v_head_init_strategy)
        if v_head_params is None:
            v_head_params = self.init_v_head(jax.random.key(seed))
        else:
            self._check_v_head(v_head_params)
        if pretrained_model.mesh is not None:  # the head joins the LM's layout (a no-op if it already has it)
            v_head_params = shard_params({"v_head": v_head_params}, pretrained_model.mesh,
                                         pretrained_model.sharding_rules)["v_head"]
        self.params: dict[str, Any] = {"pretrained_model": pretrained_model.params, "v_head": v_head_params}
        self.trainable_mask: dict[str, Any] = jax.tree_util.tree_map(lambda _: True, self.params)
        self.is_peft_model = False
        self.frozen = False  # set on reference models: the forward stops gradients
        self._forward = jax.jit(self.apply, static_argnames=("train", "output_hidden_states"))
        # LoRA adapters (trlax.adapter_models): name -> trlax.LoraConfig; the reward adapter and
        # its score head live in `reward_params`, outside `params`, so policy gradients never see them.
        self.peft_config: dict[str, Any] = {}
        self.policy_adapter_name = adapter_models.POLICY_ADAPTER_NAME
        self.reward_params: dict[str, Any] | None = None
        self.supports_rm_adapter = False
        self.rm_adapter_name: str | None = None
        self.base_model_name_or_path: str | None = getattr(self.config, "name_or_path", None) or None
        self._reward_forward = jax.jit(self.apply_reward)

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

    @property
    def v_head_dropout_prob(self) -> float | None:
        return self.v_head.dropout_prob

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def _split_kwargs(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        trl_args = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.supported_args}
        model_args = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_args}
        if kwargs:
            raise TypeError(
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
        reward_adapter_name: str = adapter_models.DEFAULT_REWARD_ADAPTER_NAME,
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

        LoRA (TRL's PEFT arguments, see `trlax.adapter_models`): `peft_config`
        (`trlax.LoraConfig`, a dict of PEFT LoraConfig fields, or a `peft.LoraConfig`) adds
        a trainable policy adapter on the frozen base; a folder or hub id holding a PEFT
        adapter_config.json loads that adapter policy (its base from
        `base_model_name_or_path`, trainable only with `is_trainable=True`, `peft_config`
        then ignored); `reward_adapter` (folder or hub id of a PEFT SEQ_CLS LoRA adapter with
        its `score` head) loads a reward adapter under `reward_adapter_name` for
        `compute_reward_score`; it needs a LoRA policy, as in TRL.
        """
        trl_args, model_args = cls._split_kwargs(dict(kwargs))
        if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
            raise ValueError(f"reward_adapter must be a local folder or a hub id; got {type(reward_adapter).__name__}")
        source = pretrained_model_name_or_path
        options = adapter_models.hub_options(model_args)
        if isinstance(source, FlaxPreTrainedModel):
            if model_args:
                raise TypeError(f"model arguments {sorted(model_args)} only apply when loading from a path or hub id")
            if source.is_encoder_decoder != cls.auto_class._encoder_decoder:
                raise TypeError(f"{cls.__name__} cannot wrap a {type(source).__name__}")
            model = cls(source, seed=seed, **trl_args)
        elif not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"pretrained_model_name_or_path must be a path, a hub id or a trlax model; "
                            f"got {type(source).__name__}")
        elif adapter_models.is_adapter_folder(source, options):
            if peft_config is not None:
                logger.warning("%s holds a PEFT adapter; the peft_config argument is ignored (as TRL does)", source)
            model = adapter_models.load_adapter_policy(cls, source, strict=strict, seed=seed, trl_args=trl_args,
                                                       model_args=model_args, is_trainable=is_trainable)
        else:
            model = cls._load(source, strict=strict, seed=seed, trl_args=trl_args, **model_args)
            model.base_model_name_or_path = str(source)
        if peft_config is not None and not model.is_peft_model:
            adapter_models.add_policy_adapter(model, peft_config, seed)
        if reward_adapter is not None:
            adapter_models.add_reward_adapter(model, str(reward_adapter), reward_adapter_name, options)
        if model.pretrained_model.mesh is not None and (model.is_peft_model or model.reward_params is not None):
            # Adapters join the mesh layout of the base they adapt (loaded leaves stay as they are).
            shard_model(model, model.pretrained_model.mesh, model.pretrained_model.sharding_rules)
        return model

    @classmethod
    def _load(cls, source: str | os.PathLike, *, strict: bool, seed: int, trl_args: dict[str, Any],
              dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, revision: str | None = None,
              token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
              local_files_only: bool = False, config: transformers.PretrainedConfig | None = None,
              place: Any = None, mesh: Mesh | None = None, sharding_rules: Any = None) -> PreTrainedModelWrapper:
        resolved = resolve_checkpoint(source, HubOptions(revision, token, cache_dir, local_files_only))
        config = config or load_config(resolved.folder, resolved.source)
        model_cls = cls.auto_class._model_class()
        model = model_cls(config, model_cls._spec_for(config), dtype=dtype, param_dtype=param_dtype)
        place = model.use_mesh(mesh, sharding_rules, place)
        head = make_value_head(config, **trl_args)
        table = model.key_table(path_prefix=("pretrained_model",))
        table.update(key_table(jax.eval_shape(lambda: init_value_head(head, jax.random.key(0))),
                               prefix=V_HEAD_PREFIX, path_prefix=("v_head",)))
        params, report = model.load_checkpoint(resolved, table, model.ignored_checkpoint_keys(value_head=False),
                                               optional_prefixes=(V_HEAD_PREFIX,), place=place)
        model.params = params["pretrained_model"]
        v_head = params.get("v_head")
        if report.missing_optional:
            message = (f"{resolved.source} has no value head ({', '.join(sorted(report.missing_optional))}); "
                       "initialised a new one. This is expected unless you are resuming PPO training.")
            if strict:
                raise CheckpointError(message + " (strict=True)")
            logger.warning(message)
            v_head = None
        return cls(model, v_head_params=v_head, seed=seed, **trl_args)

    # --- forward ------------------------------------------------------------------------
    def _params_for_forward(self, params: dict[str, Any]) -> dict[str, Any]:
        return jax.lax.stop_gradient(params) if self.frozen else params

    @staticmethod
    def _split_rng(dropout_rng: jax.Array | None, train: bool) -> tuple[jax.Array | None, jax.Array | None]:
        if not train:
            return None, None
        if dropout_rng is None:
            raise ValueError("train=True needs dropout_rng (a jax.random key) for dropout")
        base, head = jax.random.split(dropout_rng)
        return base, head

    def _values(self, params: dict[str, Any], hidden: jax.Array, rng: jax.Array | None, train: bool) -> jax.Array:
        rngs = {"dropout": rng} if train else None
        return self.v_head.apply({"params": params["v_head"]}, hidden, deterministic=not train, rngs=rngs)

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
            raise ValueError("This model does not support reward modeling adapter: load one with "
                             "from_pretrained(..., peft_config=..., reward_adapter=<PEFT reward adapter>)")
        input_ids = check_integer_ids("input_ids", input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else check_mask(
            "attention_mask", attention_mask, input_ids.shape)
        if position_ids is not None:
            position_ids = check_mask("position_ids", position_ids, input_ids.shape)
        return self._reward_forward(self.params if params is None else params,
                                    self.reward_params if reward_params is None else reward_params,
                                    input_ids, mask, position_ids)

    # --- saving -------------------------------------------------------------------------
    def state_dict(self, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """TRL's layout: the LM's transformers keys plus `v_head.summary.weight` [1, H] / `.bias` [1].
        For an adapter policy only the value head's keys, as TRL (the adapter is saved by PEFT's rules)."""
        params = self.params if params is None else params
        if self.is_peft_model:
            summary = params["v_head"]["summary"]
            return {"v_head.summary.weight": np.ascontiguousarray(np.asarray(summary["kernel"]).T),
                    "v_head.summary.bias": np.asarray(summary["bias"])}
        state = self.pretrained_model.state_dict(params["pretrained_model"])
        summary = params["v_head"]["summary"]
        state["v_head.summary.weight"] = np.ascontiguousarray(np.asarray(summary["kernel"]).T)
        state["v_head.summary.bias"] = np.asarray(summary["bias"])
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict[str, Any] | None = None,
                        max_shard_size: int | str | None = None) -> list[Path]:
        """config.json + model.safetensors (or shards) as TRL writes them; loads in TRL and transformers.
        An adapter policy writes PEFT's adapter files plus its value head instead (see
        `trlax.adapter_models.save_adapter_policy`)."""
        if self.is_peft_model:
            return adapter_models.save_adapter_policy(self, save_directory, params)
        config = self.pretrained_model.config_to_save()
        return write_checkpoint_dir(save_directory, self.state_dict(params),
                                    write_extra=lambda tmp: config.save_pretrained(str(tmp)),
                                    max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, *, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Upload what save_pretrained writes (see `trlax.checkpoint.push.push_to_hub`)."""
        from trlax.checkpoint.push import push_to_hub

        return push_to_hub(lambda folder: self.save_pretrained(folder, params=params), repo_id, **kwargs)

    def generate(self, *args: Any, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Generation with the LM's params and, for a LoRA policy, its adapter (values are not
        computed), as TRL delegates it."""
        params = self.params if params is None else params
        return self.pretrained_model.generate(*args, params=params["pretrained_model"], lora=params.get("lora"),
                                              **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pretrained_model!r}, frozen={self.frozen})"


class FlaxAutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A causal LM with TRL's value head: `model(ids, mask) -> (lm_logits, None, values)`."""

    auto_class = FlaxAutoModelForCausalLM

    def apply(
        self,
        params: dict[str, Any],
        input_ids: jax.Array,
        attention_mask: jax.Array,
        position_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[jax.Array, None, jax.Array]:
        """Pure forward: (lm_logits [B, T, V] f32, None, values [B, T] f32)."""
        params = self._params_for_forward(params)
        base_rng, head_rng = self._split_rng(dropout_rng, train)
        out = self.pretrained_model.apply(params["pretrained_model"], input_ids, attention_mask, position_ids,
                                          dropout_rng=base_rng, train=train, lora=params.get("lora"))
        values = self._values(params, out.last_hidden_state, head_rng, train)
        return out.logits.astype(jnp.float32), None, values

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: dict[str, Any] | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, None, jax.Array]:
        """TRL's 3-tuple (lm_logits [B, T, V] float32, loss None, values [B, T] float32), jitted.

        input_ids [B, T] int; attention_mask [B, T] (default all ones); position_ids as
        the LM's forward; `train=True` with `dropout_rng` enables dropout.
        """
        input_ids = check_integer_ids("input_ids", input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else check_mask(
            "attention_mask", attention_mask, input_ids.shape)
        if position_ids is not None:
            position_ids = check_mask("position_ids", position_ids, input_ids.shape)
        return self._forward(self.params if params is None else params, input_ids, mask, position_ids,
                             dropout_rng, train=train)


class FlaxAutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """An encoder-decoder LM with TRL's value head over the decoder positions."""

    auto_class = FlaxAutoModelForSeq2SeqLM

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
    ) -> tuple[jax.Array, None, jax.Array]:
        """Pure forward: (lm_logits [B, Td, V] f32, None, values [B, Td] f32)."""
        params = self._params_for_forward(params)
        base_rng, head_rng = self._split_rng(dropout_rng, train)
        out = self.pretrained_model.apply(params["pretrained_model"], input_ids, attention_mask, decoder_input_ids,
                                          decoder_attention_mask, dropout_rng=base_rng, train=train,
                                          lora=params.get("lora"))
        values = self._values(params, out.last_hidden_state, head_rng, train)
        return out.logits.astype(jnp.float32), None, values

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        params: dict[str, Any] | None = None,
        train: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, None, jax.Array]:
        """TRL's 3-tuple over decoder positions; decoder_input_ids [B, Td] are required."""
        if decoder_input_ids is None:
            raise ValueError("a seq2seq value-head model needs decoder_input_ids [B, Td] (e.g. the shifted "
                             "response, starting with config.decoder_start_token_id)")
        input_ids = check_integer_ids("input_ids", input_ids)
        decoder_input_ids = check_integer_ids("decoder_input_ids", decoder_input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else check_mask(
            "attention_mask", attention_mask, input_ids.shape)
        dmask = jnp.ones_like(decoder_input_ids) if decoder_attention_mask is None else check_mask(
            "decoder_attention_mask", decoder_attention_mask, decoder_input_ids.shape)
        return self._forward(self.params if params is None else params, input_ids, mask, decoder_input_ids, dmask,
                             dropout_rng, train=train)


# TRL's names.
AutoModelForCausalLMWithValueHead = FlaxAutoModelForCausalLMWithValueHead
AutoModelForSeq2SeqLMWithValueHead = FlaxAutoModelForSeq2SeqLMWithValueHead
