"""Everything trlax knows about one architecture family, in one place: its `ArchitectureSpec`.

A family is one modeling file: its Linen modules (named as the PyTorch modules are) and a
`SPEC` that carries every family-specific fact the rest of trlax reads:

- checkpoints: the weight layouts that differ from the generic rules (`keep_layout`,
  `stacked_weights`),
  keys transformers skips or ties (`ignored_keys`, `tied_keys`), the base-model prefix;
- meshes: the family's sharding rules (`trlax.sharding` adds the generic ones);
- PEFT: the default LoRA `target_modules` (PEFT's own table);
- TRL: the layer pattern `create_reference_model` shares by;
- generation: the KV-cache geometry (layers x KV heads x head dim).

The registry (`trlax.models.registry`) lists the families; nothing else holds a
per-family table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax

from trlax.checkpoint.naming import StackedWeight
from trlax.models.cache import CacheGeometry, KVCache, empty_kv_cache

# (regex on the "/"-joined param path, one logical axis name or None per dim); see trlax.sharding.
ParamRule = tuple[str, tuple[str | None, ...]]


def _no_check(config: Any) -> None:
    return None


def _no_defaults(config: Any) -> dict[str, str | None]:
    return {}


def tied_lm_head(embedding_key: str) -> Callable[[Any], dict[str, str]]:
    """`tied_keys` of most causal families: `lm_head.weight` is a copy of the input embedding (its HF key
    `embedding_key`) when the config ties them."""
    return lambda config: {"lm_head.weight": embedding_key} if config.tie_word_embeddings else {}


def _max_position_embeddings(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def _num_hidden_layers(config: Any) -> int:
    return config.num_hidden_layers


def embedding_rules(*names: str) -> tuple[ParamRule, ...]:
    """Token embeddings [V, H] split over the vocabulary."""
    return tuple((rf"(^|/){name}/embedding$", ("vocab", "embed")) for name in names)


def attention_rules(scope: str, q: str, kv: str, out: str, kv_axis: str = "heads",
                    biases: bool = True) -> tuple[ParamRule, ...]:
    """Separate projections: the q kernel [H, Hq * D] (and bias) split over heads, k and v (`kv`, a
    regex) over `kv_axis` ("kv_heads" where GQA has fewer), the output kernel [Hq * D, H] over its input.
    biases=False for families whose q/k/v projections never have one."""
    bias_rules = ((rf"{scope}/{q}/bias$", ("heads",)), (rf"{scope}/{kv}/bias$", (kv_axis,))) if biases else ()
    return ((rf"{scope}/{q}/kernel$", ("embed", "heads")), (rf"{scope}/{kv}/kernel$", ("embed", kv_axis)),
            *bias_rules, (rf"{scope}/{out}/kernel$", ("heads", "embed")))


def fused_attention_rules(scope: str, qkv: str, out: str, biases: bool = True) -> tuple[ParamRule, ...]:
    """One fused q | k | v projection (kernel [H, 3H], bias [3H]) split over heads, and the output projection."""
    bias_rules = ((rf"{scope}/{qkv}/bias$", ("heads",)),) if biases else ()
    return ((rf"{scope}/{qkv}/kernel$", ("embed", "heads")), *bias_rules,
            (rf"{scope}/{out}/kernel$", ("heads", "embed")))


def feed_forward_rules(inner: str, outer: str, scope: str = "mlp/", biases: bool = True) -> tuple[ParamRule, ...]:
    """A feed-forward: the `inner` projection(s) (a regex; kernel [H, I], bias [I]) split over the
    intermediate dim, the `outer` kernel [I, H] over its input. scope: the regex before the names."""
    bias_rules = ((rf"{scope}{inner}/bias$", ("mlp",)),) if biases else ()
    return ((rf"{scope}{inner}/kernel$", ("embed", "mlp")), *bias_rules, (rf"{scope}{outer}/kernel$", ("mlp", "embed")))


@dataclass(frozen=True)
class RouterOutputs:
    """A mixture of experts' router outputs (transformers' `output_router_logits`): each sparse layer's logits
    [B * T, E], the load-balancing loss [] float32, and `coefficient`, its weight in the LM loss."""

    router_logits: tuple[jax.Array, ...]
    aux_loss: jax.Array
    coefficient: float


@dataclass(frozen=True)
class ArchitectureSpec:
    """A model family: its Linen module and every fact conversion, sharding, PEFT and TRL need.

    Weight names need no table beyond this: Flax submodules carry the PyTorch names, so
    `a.b.weight` <-> `a/b/{kernel|embedding|scale}` and `a.b.bias` <-> `a/b/bias`, with
    kernels transposed unless `keep_layout` matches the key (GPT-2's Conv1D weights are
    already [in, out]).
    """

    model_types: tuple[str, ...]
    module: type[nn.Module]  # built as module(config=..., dtype=..., param_dtype=...)
    hf_architecture: str  # config.architectures entry written on save (transformers' mapping wins)
    base_model_prefix: str  # the backbone's name in the state dict ("transformer", "model", ...; "" if none)
    layer_pattern: str  # TRL's LAYER_PATTERNS entry that matches this family, e.g. "transformer.h.{layer}"
    cache_geometry: Callable[[Any], CacheGeometry]
    sharding_rules: tuple[ParamRule, ...]  # tried before trlax.sharding's generic rules
    peft_targets: tuple[str, ...]  # PEFT's default target_modules for these model types (() if PEFT has none)
    # Where PEFT's module name differs from trlax's (PEFT names modules as transformers 5 holds them in memory,
    # trlax as the checkpoint stores them): (trlax module path, PEFT's), e.g. GPT-NeoX's ("embed_out", "lm_head").
    peft_module_names: tuple[tuple[str, str], ...] = ()
    # target_modules names that PEFT (on transformers 5) turns into target_parameters on fused MoE experts or
    # the router, which trlax cannot adapt: refused.
    peft_fused_targets: tuple[str, ...] = ()
    num_layers: Callable[[Any], int] = _num_hidden_layers  # the layers `layer_pattern` counts
    keep_layout: tuple[str, ...] = ()  # regexes of HF keys stored as-is in a `kernel`
    stacked_weights: tuple[StackedWeight, ...] = ()  # MoE experts: one param, one HF tensor per expert
    ignored_keys: tuple[str, ...] = ()  # regexes of checkpoint keys transformers ignores too
    # Regexes of HF keys a float16 model holds and saves in float32 (transformers' `_keep_in_fp32_modules`).
    float32_keys: tuple[str, ...] = ()
    # HF keys that alias another tensor: key -> the key it copies (a checkpoint may store both, equal).
    tied_keys: Callable[[Any], dict[str, str]] = _no_defaults
    validate: Callable[[Any], None] = _no_check  # raises UnsupportedModelError on unsupported options
    max_positions: Callable[[Any], int | None] = _max_position_embeddings
    # Positions index a learned table of max_positions(config) rows (GPT-2, OPT, BART): a position past it is
    # an input error. False for rotary / relative positions, which have no hard limit.
    learned_positions: bool = False
    # transformers' Phi-3 drops its KV cache and recomputes every position when a LongRoPE generation first
    # reaches the pretraining length + 1 tokens (its `prepare_inputs_for_generation`); `generate` does the same.
    rebuilds_longrope_cache: bool = False
    # Config fields transformers reads at every forward (not when the model is built) that the family's modules
    # read: a change to `model.config` reaches the next call (`FlaxPreTrainedModel.sync_forward_config`). The
    # default: the attention masks' window, which transformers builds at each call (where the config has one).
    forward_config_fields: tuple[str, ...] = ("sliding_window", "layer_types")
    # Mixtures of experts: (config, the forward's sown "intermediates" collection, attention_mask [B, T] of its
    # tokens) -> RouterOutputs, computed when config.output_router_logits is set; None for dense families.
    router_outputs: Callable[[Any, dict[str, Any], jax.Array], RouterOutputs] | None = None
    # Encoder-decoder families only:
    is_encoder_decoder: bool = False
    raw_keys: tuple[str, ...] = ()  # top-level params stored under their own name (BART's final_logits_bias)
    # Without decoder_input_ids or labels, the decoder reads input_ids shifted right (BART, as its BartModel).
    decoder_inputs_from_input_ids: bool = False
    # HF keys transformers fills itself when absent: key -> the key it copies, or None for zeros.
    key_defaults: Callable[[Any], dict[str, str | None]] = _no_defaults

    def position_limit(self, config: Any) -> int | None:
        """How many positions the model can embed (a learned table's rows); None when unlimited."""
        return self.max_positions(config) if self.learned_positions else None

    def init_cache(self, config: Any, batch: int, max_len: int, dtype: Any) -> list[KVCache]:
        """A zeroed KV cache for `batch` rows of `max_len` slots (see `CacheGeometry`)."""
        return empty_kv_cache(batch, max_len, self.cache_geometry(config), dtype)
