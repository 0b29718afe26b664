"""What trlax needs to know about one architecture family, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn


def _no_check(config: Any) -> None:
    return None


def _no_tied_keys(config: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class ArchitectureSpec:
    """A model family: its Linen module and the few facts conversion and TRL need.

    Weight names need no table beyond this: Flax submodules carry the PyTorch names, so
    `a.b.weight` <-> `a/b/{kernel|embedding|scale}` and `a.b.bias` <-> `a/b/bias`, with
    kernels transposed unless `keep_layout` matches the key (GPT-2's Conv1D weights are
    already [in, out]).
    """

    model_types: tuple[str, ...]
    module: type[nn.Module]  # built as module(config=..., dtype=..., param_dtype=...)
    hf_architecture: str  # config.architectures entry written on save
    num_layers: Callable[[Any], int]
    layer_pattern: str | None  # TRL's LAYER_PATTERNS entry, e.g. "transformer.h.{layer}"
    init_cache: Callable[..., Any]  # (config, batch, max_len, dtype) -> cache pytree
    is_encoder_decoder: bool = False
    keep_layout: tuple[str, ...] = ()  # regexes of HF keys stored as-is in a `kernel`
    ignored_keys: tuple[str, ...] = ()  # regexes of checkpoint keys transformers ignores too
    tied_keys: Callable[[Any], tuple[str, ...]] = _no_tied_keys  # HF keys that alias another
    validate: Callable[[Any], None] = _no_check  # raises ValueError on unsupported options
    lora_targets: tuple[str, ...] = field(default=())  # PEFT target module names it knows
    max_positions: Callable[[Any], int | None] = lambda config: getattr(config, "max_position_embeddings", None)
