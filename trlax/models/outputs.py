"""Model outputs: small pytrees, so they pass through jit unchanged."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


class CacheUnderTransformersName:
    """`past_key_values`: an LM output's `cache` (one {"k", "v"} [B, Hkv, S, D] per layer, or None) under
    transformers' name."""

    cache: Any

    @property
    def past_key_values(self) -> Any:
        """The KV cache under transformers' name: one {"k", "v"} [B, Hkv, S, D] per layer, or None."""
        return self.cache


@flax.struct.dataclass
class CausalLMOutput(CacheUnderTransformersName):
    """Output of a causal LM module.

    logits: [B, T, V] float32 (whatever the compute dtype).
    last_hidden_state: [B, T, H'] compute dtype: the LM head's input (after the final
        norm, and OPT's project_out), i.e. what TRL's value head reads.
    hidden_states: None, or n_layers + 1 arrays [B, T, H] as transformers returns them
        (embeddings, each layer's output, the last one replaced by the normed state).
    cache: None, or the updated KV cache (one {"k", "v"} dict per layer); `past_key_values`
        is its transformers name.
    loss: None, or with `labels` transformers' shifted LM loss [] float32 (`trlax.models.loss`), plus
        `router_aux_loss_coef` x `aux_loss` for a mixture of experts with `config.output_router_logits`.
    aux_loss, router_logits: None, or with a mixture of experts' `config.output_router_logits` (as
        transformers) its load-balancing loss [] float32 and each sparse layer's router logits [B * T, E].
    """

    logits: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    cache: Any = None
    loss: jax.Array | None = None
    aux_loss: jax.Array | None = None
    router_logits: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class Seq2SeqLMOutput(CacheUnderTransformersName):
    """Output of an encoder-decoder LM module.

    logits: [B, Td, V] float32; last_hidden_state: the decoder's final state [B, Td, H]
    (value-head input); encoder_last_hidden_state: [B, Te, H]; *_hidden_states as
    transformers returns them; cache: the decoder's self-attention KV cache; loss: None,
    or with `labels` transformers' decoder LM loss [] float32.
    """

    logits: jax.Array
    last_hidden_state: jax.Array
    encoder_last_hidden_state: jax.Array
    decoder_hidden_states: tuple[jax.Array, ...] | None = None
    encoder_hidden_states: tuple[jax.Array, ...] | None = None
    cache: Any = None
    loss: jax.Array | None = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    """Output of a sequence-classification model (reward / value model).

    logits: [B, L] float32, the score head at each row's pooled token (transformers' `logits`);
    token_logits: [B, T, L] float32, the score head on every position (TRL's value model reads these);
    last_hidden_state: [B, T, H'] compute dtype, the score head's input;
    hidden_states: None, or n_layers + 1 arrays [B, T, H] as transformers returns them;
    pooled_index: [B] int32, the pooled position of each row;
    loss: None, or transformers' loss for `config.problem_type` when labels were given.
    """

    logits: jax.Array
    token_logits: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooled_index: jax.Array | None = None
    loss: jax.Array | None = None
