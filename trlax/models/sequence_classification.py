"""Sequence classification (reward and value models) on any decoder family: transformers' `*ForSequenceClassification`.

The module is the family's causal-LM module with the LM head swapped for transformers'
`score` head (a Dense H' -> num_labels, no bias), built from the family's SPEC alone: the
backbone, its name and its default positions come from `SPEC.module`, so every decoder
family in `trlax.models.registry` gets one without a line of its own.

Pooling is transformers': the logits of the rightmost token that is not
`config.pad_token_id` (left or right padding alike; a row of pads only pools position 0);
with no pad id, the last position (transformers refuses batches > 1 then, and so does
`__call__`). Param paths are the state-dict keys (`model.layers.0...`, `score.weight`), so
checkpoints saved by transformers load and ones saved here load in transformers. Loading a
causal-LM checkpoint (no `score.weight`) initialises the head as transformers does and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import numbers
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from trlax.checkpoint.loading import Placer
from trlax.checkpoint.naming import set_path
from trlax.errors import InputError, TrlaxTypeError, UnsupportedModelError
from trlax.inputs import (
    IGNORE_INDEX,
    check_forward_flags,
    is_concrete,
    mask_for,
    refuse_unsupported_arguments,
    same_shape,
    token_ids,
)
from trlax.models.base import FlaxPreTrainedModel
from trlax.models.decoder import CausalLM
from trlax.models.layers import HFModule, initializer_range
from trlax.models.outputs import SequenceClassifierOutput
from trlax.models.spec import ArchitectureSpec

logger = logging.getLogger("trlax")

Array = jax.Array
SCORE = "score"  # transformers' head name (and TRL's / PEFT's `modules_to_save` entry)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def pad_token_id(config: Any) -> int | None:
    """The pad id transformers pools by: `config.get_text_config().pad_token_id`."""
    pad = config.get_text_config().pad_token_id
    return None if pad is None else int(pad)


def pad_id_array(config: Any) -> Array:
    """The config's pad id as an int32 scalar, -1 when it has none (no token id is -1)."""
    pad = pad_token_id(config)
    return jnp.asarray(-1 if pad is None else pad, jnp.int32)


def last_true_index(valid: Array) -> Array:
    """[B] int32: the rightmost position where `valid` [B, T] is true, by transformers' pooling rule (argmax of
    `arange(T) * valid`, so a row with none gives 0)."""
    positions = jnp.arange(valid.shape[1], dtype=jnp.int32)[None] * jnp.asarray(valid).astype(jnp.int32)
    return jnp.argmax(positions, axis=-1).astype(jnp.int32)


def last_non_pad_index(input_ids: Array, pad_id: int | Array | None) -> Array:
    """[B] int32: transformers' pooling index, the rightmost position whose id is not `pad_id` (an all-pad row
    gives 0); T - 1 without a pad id (None or -1)."""
    return last_true_index(jnp.asarray(input_ids) != (-1 if pad_id is None else pad_id))


class SequenceClassifierHead(HFModule):
    """Mixed in before a family's `CausalLM` (see `sequence_classifier_module`): the same backbone
    under the same name, then `score` instead of the LM head."""

    lm_module: ClassVar[type[nn.Module]]  # the family's causal-LM class this class is built on

    def __reduce__(self) -> tuple[Any, ...]:
        """pickle and deepcopy: the class is built at run time, so an instance is rebuilt from its family's LM
        class and its fields (`classifier_with_fields`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return classifier_with_fields, (self.lm_module, fields)

    def setup(self) -> None:
        c = self.config
        setattr(self, self.backbone_name, self.backbone_cls(c, self.dtype, self.param_dtype))
        self.score = self.linear(c.num_labels, use_bias=False)

    def __call__(self, input_ids: Array, attention_mask: Array, position_ids: Array | None = None,
                 pad_id: Array | None = None, *, deterministic: bool = True,
                 output_hidden_states: bool = False) -> SequenceClassifierOutput:
        """pad_id: int32 [] the pooling pad id (-1: none); None: the config's."""
        cache_index = jnp.zeros((), jnp.int32)
        if position_ids is None:
            position_ids = self.default_positions(input_ids, attention_mask, cache_index)
        h, hidden, _ = getattr(self, self.backbone_name)(
            input_ids, attention_mask, position_ids, deterministic=deterministic,
            output_hidden_states=output_hidden_states, cache=None, cache_index=cache_index)
        token_logits = self.score(h).astype(jnp.float32)  # [B, T, L]; computed in the compute dtype as transformers
        index = last_non_pad_index(input_ids, pad_id_array(self.config) if pad_id is None else pad_id)
        logits = jnp.take_along_axis(token_logits, index[:, None, None], axis=1)[:, 0]  # [B, L]
        return SequenceClassifierOutput(logits=logits, token_logits=token_logits, last_hidden_state=h,
                                        hidden_states=hidden, pooled_index=index)


@functools.cache
def sequence_classifier_module(lm_module: type[nn.Module]) -> type[nn.Module]:
    """The `*ForSequenceClassification` Linen class of a family's causal-LM module class."""
    if not (isinstance(lm_module, type) and issubclass(lm_module, CausalLM)):
        raise UnsupportedModelError(f"{getattr(lm_module, '__name__', lm_module)} is not built on trlax's decoder "
                                    "skeleton (trlax.models.decoder.CausalLM); sequence classification needs one")
    name = lm_module.__name__.replace("LMHeadModel", "ForCausalLM").replace("ForCausalLM", "ForSequenceClassification")
    return type(name, (SequenceClassifierHead, lm_module), {"__module__": __name__, "lm_module": lm_module})


def classifier_with_fields(lm_module: type[nn.Module], fields: dict[str, Any]) -> nn.Module:
    """The sequence-classification module on `lm_module` with these dataclass fields (how one unpickles)."""
    return sequence_classifier_module(lm_module)(**fields)


def infer_problem_type(num_labels: int, labels: Array) -> str:
    """transformers' rule when `config.problem_type` is None."""
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def check_classification_labels(labels: Array, batch: int, num_labels: int, problem_type: str) -> None:
    """InputError unless `labels` fit pooled logits [batch, num_labels] under `problem_type`, where transformers
    raises too (a batch size that differs, a class out of bounds) and JAX would broadcast or give NaN: single
    label: [batch] integer classes in [0, num_labels) or -100; regression: [batch] (one label) or [batch,
    num_labels]; multi-label: [batch, num_labels]. Class values are checked when concrete."""
    if problem_type not in PROBLEM_TYPES:
        raise InputError(f"config.problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")
    single = problem_type == "single_label_classification"
    # transformers flattens single-label labels and squeezes a single regression label; the others must match.
    flattened = single or (problem_type == "regression" and num_labels == 1)
    want = (batch,) if flattened else (batch, num_labels)
    if (labels.size != batch) if flattened else (labels.shape != want):
        raise InputError(f"labels has shape {labels.shape}; a {problem_type} model with {num_labels} label(s) and "
                         f"a batch of {batch} takes {want}")
    if not single:
        return
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(f"labels must be integer classes for single_label_classification; got {labels.dtype}")
    if is_concrete(labels):
        values = np.asarray(labels)
        bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_labels))]
        if bad.size:
            raise InputError(f"labels holds class {int(bad[0])}; classes are 0..{num_labels - 1} (or "
                             f"{IGNORE_INDEX} for a row the loss ignores)")


def classification_loss(logits: Array, labels: Array, problem_type: str) -> Array:
    """transformers' `ForSequenceClassificationLoss` on pooled logits [B, L]: a float32 scalar.

    regression: MSE (labels [B] or [B, L] float); single_label_classification: mean cross
    entropy over labels [B] int (-100 ignored); multi_label_classification: BCE with logits,
    labels [B, L] float.
    """
    logits = logits.astype(jnp.float32)
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return jnp.mean(jnp.square(jnp.squeeze(logits) - jnp.squeeze(labels).astype(jnp.float32)))
        return jnp.mean(jnp.square(logits - labels.astype(jnp.float32)))
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1)
        valid = labels != -100
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.reshape(labels.shape[0], -1),
                                                                 jnp.where(valid, labels, 0))
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid, dtype=jnp.float32)
    if problem_type == "multi_label_classification":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
    raise InputError(f"config.problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")


class FlaxModelForSequenceClassification(FlaxPreTrainedModel):
    """A decoder LM with transformers' `score` head: a reward model, or TRL's separate value model.

    Build it with `FlaxAutoModelForSequenceClassification`. `model(ids, mask).logits` are
    the pooled scores [B, num_labels] float32; `.token_logits` [B, T, num_labels] are the
    head on every position (what TRL's PPO reads from a value model).
    """

    can_generate = False
    constructor_arguments = ("num_labels", "problem_type", "seed")

    def __init__(self, config: transformers.PretrainedConfig, spec: ArchitectureSpec | None = None,
                 params: dict[str, Any] | None = None, *, num_labels: int | None = None,
                 problem_type: str | None = None, seed: int = 0, **kwargs: Any) -> None:
        """num_labels / problem_type: override the config's (on a copy; `from_pretrained` passes them
        here, so a checkpoint whose score head has another num_labels fails with a CheckpointError).
        seed: the init of a `score` head the checkpoint lacks (see `complete_params`)."""
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral)):
            raise TrlaxTypeError(f"num_labels must be an int >= 1; got {num_labels!r} ({type(num_labels).__name__})")
        num_labels = None if num_labels is None else int(num_labels)  # numpy's too, as transformers takes it
        updates = {name: value for name, value in (("num_labels", num_labels), ("problem_type", problem_type))
                   if value is not None}
        if updates:
            config = config.__class__.from_dict(config.to_dict())
            for name, value in updates.items():
                setattr(config, name, value)
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{config.model_type} is an encoder-decoder model: trlax's sequence classifiers are decoder-only "
                "(transformers' *ForSequenceClassification with a `score` head on the last token); an "
                "encoder-decoder classifier (BartForSequenceClassification, T5ForSequenceClassification) is not "
                "supported")
        self.score_seed = seed
        self.new_score_head = False  # set by a load: whether `score` was initialised here (the checkpoint had none)
        if config.num_labels < 1:
            raise UnsupportedModelError(f"num_labels must be >= 1; the config has {config.num_labels}")
        problem = getattr(config, "problem_type", None)
        if problem is not None and problem not in PROBLEM_TYPES:
            raise UnsupportedModelError(f"config.problem_type {problem!r} is not one of {PROBLEM_TYPES}")
        super().__init__(config, spec, params, **kwargs)

    @classmethod
    def module_for(cls, spec: ArchitectureSpec) -> type[nn.Module]:
        return sequence_classifier_module(spec.module)

    def apply(self, params: dict[str, Any], input_ids: Array, attention_mask: Array,
              position_ids: Array | None = None, dropout_rng: Array | None = None, train: bool = False,
              output_hidden_states: bool = False, lora: dict[str, Any] | None = None,
              pad_id: Array | None = None, lora_dropout: float = 0.0) -> SequenceClassifierOutput:
        """The pure forward (no jit); lora: an adapter tree on `params`, or None; lora_dropout: its dropout rate,
        as `FlaxModelForCausalLM.apply`'s. pad_id: the pooling pad id (int32 [], -1: none); None:
        `config.pad_token_id` as it is when traced. Concrete token ids and positions are checked as `__call__`
        checks them."""
        self.check_token_inputs(input_ids, attention_mask, position_ids)
        return self.apply_module(params, input_ids, attention_mask, position_ids, pad_id, lora=lora, train=train,
                                 dropout_rng=dropout_rng, lora_dropout=lora_dropout,
                                 output_hidden_states=output_hidden_states)

    def adapter_for(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """The LoRA adapter a call applies: the owning policy's, only on the model's own params."""
        return self.lora if params is None else None

    def __call__(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                 params: dict[str, Any] | None = None, labels: Any = None, output_hidden_states: bool | None = None,
                 train: bool = False, dropout_rng: Array | None = None,
                 **unsupported: Any) -> SequenceClassifierOutput:
        """Forward pass, jit-compiled once per shape.

        input_ids [B, T] int; attention_mask [B, T] (default all ones); position_ids [B, T]
        (default the family's, as transformers). Pools at the last non-pad token (see the
        module docstring). Token ids outside [0, vocab_size) and positions past a learned
        position table raise InputError. labels: [B] (regression / single label) or [B, L], giving `loss`
        as transformers computes it for `config.problem_type` (inferred and stored in the
        config when None, as transformers does). The LoRA adapter a call applies (`adapter_for`) comes with its
        `lora_dropout` (`train=True` only).
        """
        refuse_unsupported_arguments(unsupported, f"{type(self).__name__}.__call__")
        check_forward_flags(f"{type(self).__name__}.__call__", train=train, output_hidden_states=output_hidden_states)
        input_ids = token_ids("input_ids", input_ids)
        mask = mask_for("attention_mask", attention_mask, input_ids)
        if position_ids is not None:
            position_ids = same_shape("position_ids", position_ids, input_ids.shape)
        self.check_token_inputs(input_ids, mask, position_ids)
        if pad_token_id(self.config) is None and input_ids.shape[0] != 1:
            raise InputError("this sequence-classification model has no config.pad_token_id, so it cannot find the "
                             "last token of padded rows (transformers refuses batches > 1 too): set "
                             "model.config.pad_token_id, or pass one sequence at a time")
        lora = self.adapter_for(params)
        out = self._forward(self.params if params is None else params, input_ids, mask, position_ids, dropout_rng,
                            train=train, output_hidden_states=self.wants_hidden_states(output_hidden_states),
                            lora=lora, lora_dropout=0.0 if lora is None else self.lora_dropout,
                            pad_id=pad_id_array(self.config))  # read now: a changed pad id needs no new trace
        if labels is None:
            return out
        labels = jnp.asarray(labels)
        problem_type = self.config.problem_type or infer_problem_type(self.config.num_labels, labels)
        check_classification_labels(labels, input_ids.shape[0], self.config.num_labels, problem_type)
        self.config.problem_type = problem_type
        return out.replace(loss=classification_loss(out.logits, labels, problem_type))

    # --- checkpoints --------------------------------------------------------------------
    def ignored_checkpoint_keys(self, value_head: bool = True) -> tuple[str, ...]:
        """Also skips a causal-LM checkpoint's LM head (transformers drops it the same way)."""
        return (*super().ignored_checkpoint_keys(value_head), rf"^{self.lm_head_name()}\.")

    def tied_copies(self) -> dict[str, str]:
        """The base class's tied copies, less the LM head's (this model skips the LM head)."""
        head = f"{self.lm_head_name()}."
        return {k: v for k, v in super().tied_copies().items() if not k.startswith(head)}

    def lm_head_name(self) -> str:
        """The HF name of the family's LM head (`lm_head`; GPT-NeoX `embed_out`)."""
        return self.spec.module.head_name

    def optional_checkpoint_prefixes(self) -> tuple[str, ...]:
        """A causal-LM (or base-model) checkpoint has no `score` head: it loads, and gets a new one."""
        return (f"{SCORE}.",)

    def complete_params(self, params: dict[str, Any], missing: list[str], source: str,
                        place: Placer | None) -> dict[str, Any]:
        """A new `score` head (N(0, initializer_range) from `seed`) when the checkpoint had none,
        with a warning, as transformers does."""
        self.new_score_head = bool(missing)
        if not missing:
            return params
        logger.warning("%s has no %s.weight (not a sequence-classification checkpoint): initialised a new score "
                       "head [%d labels] from seed %d; train it before using its outputs", source, SCORE,
                       self.config.num_labels, self.score_seed)
        kernel, path = self.init_score(self.score_seed), (SCORE, "kernel")
        set_path(params, path, jax.device_put(kernel) if place is None else place(path, np.asarray(kernel)))
        return params

    def init_score(self, seed: int = 0) -> Array:
        """A fresh score kernel [H', num_labels]: N(0, initializer_range), transformers' init."""
        shape = self.abstract_params()[SCORE]["kernel"]
        std = initializer_range(self.config)
        return (jax.random.normal(jax.random.key(seed), shape.shape, jnp.float32) * std).astype(shape.dtype)

    def config_to_save(self, dtype: Any = None) -> transformers.PretrainedConfig:
        """The config with `architectures` naming transformers' sequence-classification class
        (and `dtype` the dtype of the tensors written with it, when given)."""
        config = super().config_to_save(dtype)
        default = sequence_classifier_module(self.spec.module).__name__
        config.architectures = [MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type, default)]
        return config
