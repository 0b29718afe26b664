"""transformers' GenerationConfig for trlax's generate, and the logits processors it adds.

Which settings apply (highest first): keyword arguments to `generate`, a `generation_config`
passed to it, the model's own `generation_config` (read from the checkpoint's
generation_config.json, or, without one, built from config.json as transformers does, so
an older checkpoint's generation fields there apply or are refused), then trlax's defaults.
A keyword argument set to None unsets the field below it (`eos_token_id=None`: no eos), as
in transformers. transformers v5 leaves unset fields None, so "set" is well defined. The pad
id comes from these settings only, falling back to the first eos id (transformers' rule,
which ignores config.json's pad when generation_config.json has none); `min_new_tokens`, when
set, takes precedence over `min_length`. For fields nobody set, trlax keeps its
defaults where they differ from transformers': `top_k` 0 (transformers: 50), so sampling
draws from the model's full distribution, which PPO's log-probs assume, and
`max_new_tokens` 32 (transformers: 20 new tokens, fewer where prompt + 20 passes the model's
`max_position_embeddings`).

Fields trlax implements: max_new_tokens, max_length, min_new_tokens, min_length,
do_sample, temperature, top_k, top_p, repetition_penalty, eos/pad/decoder start ids,
forced_eos_token_id and return_dict_in_generate. Fields that only tune how transformers runs (cache, compile,
bos_token_id, beam-only options while num_beams is 1, ...) are accepted and have no
effect. Any other field set to something other than its neutral value (num_beams > 1,
constraints, no_repeat_ngram_size, output_scores, ...) is an UnsupportedModelError naming
it, never silently ignored; so is a model input other than the ids and mask (token_type_ids,
...). A keyword that is neither a setting nor a generate argument (a typo) is a TrlaxTypeError.
A GenerationConfig's custom entries (names that are not its fields, which transformers keeps and
never reads) are ignored (in a dict passed as `generation_config`, an unknown name is refused as a
typo); empty `bad_words_ids` / `sequence_bias`, which transformers refuses, are refused too.

The processors (`process_logits`) run inside the jitted decode loop on each step's
float32 logits [B, V], before the sampling warpers, as transformers orders them:
repetition penalty (logits of tokens already in the sequence: divided by the penalty if
positive, multiplied if negative; the prompt's left padding does not count, as in
transformers v5), then min-length (eos ids at -inf while fewer than `min_new_tokens`
tokens are new), then forced eos (only the forced ids at the last new token).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from trlax.checkpoint.hub import HubOptions, fetch_file
from trlax.errors import InputError, TrlaxTypeError, UnsupportedModelError
from trlax.inputs import is_concrete

logger = logging.getLogger("trlax")

GENERATION_CONFIG_NAME = "generation_config.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_NEW_TOKENS = 32

# GenerationConfig fields trlax implements (translated by `resolve_generation`).
SUPPORTED_FIELDS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "decoder_start_token_id", "return_dict_in_generate",
    "forced_eos_token_id",
})
# Fields with no effect on greedy or sampled tokens (how transformers runs, or beam-search-only
# options, beams being refused): accepted whatever their value.
NO_EFFECT_FIELDS = frozenset({
    "_from_model_config", "transformers_version", "bos_token_id", "use_cache", "cache_implementation",
    "cache_config", "max_cache_len", "compile_config", "disable_compile", "low_memory", "prefill_chunk_size",
    "early_stopping", "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "is_assistant",
    "max_matching_ngram_size", "continuous_batching_config",
})
# Arguments of trlax's generate that are not GenerationConfig fields.
TRLAX_ARGS = frozenset({"prng_key", "params", "lora", "decoder_input_ids", "rollout_dtype"})
# transformers 5's `generate` arguments besides the settings (written out: GenerationMixin needs torch), and
# the model inputs it passes on: refused unless neutral, like any setting trlax lacks. (Its `inputs`, the
# prompt, is `FlaxPreTrainedModel.generate`'s input_ids.)
TRANSFORMERS_ARGS = frozenset({
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
    "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
    "use_model_defaults", "tokenizer", "token_type_ids", "position_ids", "inputs_embeds", "decoder_attention_mask",
    "encoder_outputs", "past_key_values", "cache_position",
})
# GenerationConfig's own fields. A config's other entries (custom ones, e.g. a checkpoint's `user_token_id`,
# which transformers keeps and never reads) are ignored as transformers ignores them.
CONFIG_FIELDS = frozenset({*transformers.GenerationConfig().to_dict(), *SUPPORTED_FIELDS, *NO_EFFECT_FIELDS})
# Every name a generate call may pass; others are typos.
KNOWN_NAMES = frozenset({*CONFIG_FIELDS, *TRANSFORMERS_ARGS, *TRLAX_ARGS})


def read_generation_config(source: str | os.PathLike, options: HubOptions) -> transformers.GenerationConfig | None:
    """The checkpoint's generation settings (folder or hub id) as transformers reads them: its
    generation_config.json or, without one (or when it cannot be read: a warning says so), the
    generation fields of its config.json; None without either."""
    path = fetch_file(source, GENERATION_CONFIG_NAME, options)
    if path is not None:
        try:
            return transformers.GenerationConfig.from_pretrained(str(path.parent))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            logger.warning("%s cannot be read (%s: %s); the generation settings come from config.json instead "
                           "(fix or delete the file)", path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    path = fetch_file(source, CONFIG_NAME, options, config_required=False)  # a weights-only source: none
    return None if path is None else transformers.GenerationConfig.from_pretrained(
        str(path.parent), config_file_name=CONFIG_NAME, _from_model_config=True)


def write_generation_config(config: transformers.GenerationConfig, folder: Path) -> None:
    """Write generation_config.json into `folder` (what transformers' save_pretrained writes)."""
    config.save_pretrained(str(folder))


def _set_fields(config: transformers.GenerationConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields a config sets (not None): a GenerationConfig's own, without its custom entries; a dict's all
    (an unknown name there is a typo, refused with the unimplemented settings)."""
    if config is None:
        return {}
    if isinstance(config, transformers.GenerationConfig):
        return {k: v for k, v in config.to_dict().items() if v is not None and k in CONFIG_FIELDS}
    return {k: v for k, v in config.items() if v is not None}


# Values transformers treats as "off" although they are not the field's default (None).
NO_OP_VALUES = {"min_p": 0.0, "guidance_scale": 1.0}
# Fields whose empty value transformers refuses (its logits processor raises) instead of taking it as off.
EMPTY_REFUSED = frozenset({"bad_words_ids", "sequence_bias"})


def _is_array(value: Any) -> bool:
    """An array (numpy, jax, torch), not a scalar setting."""
    return hasattr(value, "shape") and not isinstance(value, np.generic)


def _is_neutral(name: str, value: Any, defaults: Mapping[str, Any]) -> bool:
    """Whether a field's value asks for nothing (unset, off, or transformers' default). An array asks for
    something (e.g. token_type_ids)."""
    if _is_array(value):
        return False
    return (value is None or value is False or ((value == {} or value == []) and name not in EMPTY_REFUSED)
            or value == defaults.get(name) or (name in NO_OP_VALUES and value == NO_OP_VALUES[name]))


def _shown(value: Any) -> str:
    """A setting for an error message: arrays by shape, the rest as they are."""
    if _is_array(value):
        return f"<array of shape {tuple(value.shape)}>"
    return repr(value)


def _as_int(name: str, value: Any) -> int:
    if not isinstance(value, bool) and (isinstance(value, (int, np.integer)) or (
            isinstance(value, float) and value.is_integer())):
        return int(value)
    raise TrlaxTypeError(f"generate: {name} must be an integer; got {value!r}")


@dataclass(frozen=True)
class GenerateRequest:
    """A generate call translated for `trlax.generation.generate`: its keyword arguments, and
    whether to return a GenerateOutput (True) or the bare sequences array."""

    kwargs: dict[str, Any]
    return_dict: bool


def resolve_generation(
    model_config: transformers.GenerationConfig | None,
    generation_config: transformers.GenerationConfig | Mapping[str, Any] | None,
    kwargs: Mapping[str, Any],
    *,
    prompt_length: Callable[[int | None], int],
) -> GenerateRequest:
    """Merge the model's GenerationConfig, a passed one and keyword arguments (in that order of
    precedence, lowest first) into trlax's generate arguments.

    prompt_length: the length `max_length` / `min_length` count from, given the decoder start id
    the settings name (causal: the padded prompt T; seq2seq: the decoder prompt, start token
    included when it is put in front). Raises
    UnsupportedModelError naming every field set that trlax does not implement.
    """
    if generation_config is not None and not isinstance(generation_config, (transformers.GenerationConfig, Mapping)):
        raise UnsupportedModelError(f"generation_config must be a transformers.GenerationConfig; got "
                                    f"{type(generation_config).__name__}")
    passed = {k: v for k, v in kwargs.items() if k not in TRLAX_ARGS}
    # A keyword argument of None unsets what the configs below it set, as in transformers.
    refuse_traced_token_ids(passed)
    merged = {k: v for k, v in {**_set_fields(model_config), **_set_fields(generation_config), **passed}.items()
              if v is not None}
    # Output plumbing is the caller's choice, never a checkpoint file's.
    return_dict = _set_fields({**_set_fields(generation_config), **passed}).get("return_dict_in_generate", True)
    unknown = sorted(set(passed) - KNOWN_NAMES)
    if unknown:
        raise TrlaxTypeError(f"generate got unknown keyword argument(s) {unknown}: neither generation settings "
                             "(transformers.GenerationConfig fields) nor arguments of transformers' or trlax's "
                             "generate")
    defaults = transformers.GenerationConfig()._get_default_generation_params()
    unsupported = sorted(name for name, value in merged.items()
                         if name not in SUPPORTED_FIELDS and name not in NO_EFFECT_FIELDS
                         and not _is_neutral(name, value, defaults))
    if unsupported:
        shown = ", ".join(f"{name}={_shown(merged[name])}" for name in unsupported)
        raise UnsupportedModelError(
            f"generate does not implement {shown}: trlax generates greedily or by sampling (temperature, top_k, "
            "top_p, repetition_penalty, min_new_tokens), one sequence per prompt, without beams, constraints or "
            "score outputs. Unset these (from the generation_config, or pass e.g. num_beams=1)")
    out = {k: trlax_kwargs for k, trlax_kwargs in kwargs.items() if k in TRLAX_ARGS}
    # transformers' decoder start: the settings' decoder_start_token_id, else their bos_token_id (a generation
    # config without either: transformers raises, trlax's generate takes config.json's).
    if "decoder_start_token_id" not in merged and "bos_token_id" in merged:
        merged["decoder_start_token_id"] = merged["bos_token_id"]
    length = prompt_length(merged.get("decoder_start_token_id"))
    if "max_new_tokens" in merged:
        out["max_new_tokens"] = _as_int("max_new_tokens", merged["max_new_tokens"])
    elif "max_length" in merged:
        new = _as_int("max_length", merged["max_length"]) - length
        if new <= 0:
            raise UnsupportedModelError(f"generate: max_length={merged['max_length']} leaves no room after the "
                                        f"{length}-token prompt; set max_new_tokens instead")
        out["max_new_tokens"] = new
    else:
        out["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if "min_new_tokens" in merged:  # transformers: it takes precedence over min_length (a negative one: 0)
        out["min_new_tokens"] = max(_as_int("min_new_tokens", merged["min_new_tokens"]), 0)
    else:
        out["min_new_tokens"] = max(_as_int("min_length", merged.get("min_length", 0)) - length, 0)
    out["top_k"] = _as_int("top_k", merged.get("top_k", 0))
    for name in ("do_sample", "temperature", "top_p", "repetition_penalty", "decoder_start_token_id",
                 "forced_eos_token_id"):
        if name in merged:
            out[name] = merged[name]
    eos = merged.get("eos_token_id")
    out["eos_token_id"] = [] if eos is None else eos
    eos_ids = id_list(eos)
    # transformers' pad: the settings' own, else the first eos (config.json's pad does not enter).
    out["pad_token_id"] = merged.get("pad_token_id", eos_ids[0] if eos_ids else None)
    return GenerateRequest(out, bool(return_dict))


TOKEN_ID_SETTINGS = ("pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id")


def refuse_traced_token_ids(settings: dict[str, Any]) -> None:
    """TrlaxTypeError when a token-id setting among `settings` (name -> an int, a list or None) is traced: the
    ids shape the compiled loop (which rows stop, what they emit), so they are Python ints."""
    for name in TOKEN_ID_SETTINGS:
        ids = settings.get(name)
        if any(isinstance(i, jax.core.Tracer) for i in (ids if isinstance(ids, (list, tuple)) else (ids,))):
            raise TrlaxTypeError(f"{name} must be Python ints: token ids shape the compiled generation loop (which "
                                 "rows stop, what they emit); got a traced value: pass it from outside the jitted "
                                 "function")


def id_list(ids: int | Sequence[int] | None) -> list[int]:
    """A token-id setting (an int, a list, or None) as a list of ints; InputError for anything else."""
    if ids is None:
        return []
    flat = np.asarray(ids)
    if flat.size == 0 and flat.ndim == 1:
        return []
    if flat.ndim > 1 or not np.issubdtype(flat.dtype, np.integer):
        raise InputError(f"token-id settings (eos_token_id, pad_token_id, ...) are an int or a flat list of ints; "
                         f"got {ids!r}")
    return [int(i) for i in flat.reshape(-1)]


def inferred_attention_mask(input_ids: jax.Array, pad_token_id: int | None, eos_token_id: Any) -> jax.Array | None:
    """transformers' attention mask for a causal LM's generate call without one: [B, T] int32
    `input_ids != pad` when the pad id occurs in the input_ids and is no eos id; else None (all
    ones). A row that ends in the pad id keeps the all-ones mask, with a warning (a prompt must end in a
    real token; transformers warns of right padding too). transformers infers none for an encoder-decoder.
    Traced input_ids (under jax.jit) get the same rule computed in the program, without the warning.
    """
    if pad_token_id is None or pad_token_id in id_list(eos_token_id):
        return None
    if not is_concrete(input_ids):
        padded = jnp.any(input_ids == pad_token_id) & ~jnp.any(input_ids[:, -1] == pad_token_id)
        return jnp.where(padded, input_ids != pad_token_id, True).astype(jnp.int32)
    ids = jax.device_get(input_ids)  # an explicit transfer (jax.transfer_guard allows it)
    if not (ids == pad_token_id).any():
        return None
    if (ids[:, -1] == pad_token_id).any():
        logger.warning("input_ids end in the pad id %d in some row (right padding?), so no attention mask is "
                       "inferred from it: every token is attended to. Left-pad the prompts and pass "
                       "attention_mask", pad_token_id)
        return None
    return jax.device_put((ids != pad_token_id).astype(np.int32))  # explicitly: jax.transfer_guard allows it


# --- logits processors, inside the jitted decode loop ---------------------------------------------

# An id no vocabulary has: scattered with mode="drop", it marks nothing.
NO_TOKEN = jnp.iinfo(jnp.int32).max


def penalty_context(prompt_ids: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """The prompt ids [B, T] the repetition penalty sees: transformers v5 skips each row's leading
    padding (positions before its first real token), marked here as NO_TOKEN."""
    first_real = jnp.argmax(prompt_mask != 0, axis=1)  # [B]
    positions = jnp.arange(prompt_ids.shape[1])[None, :]
    return jnp.where(positions < first_real[:, None], NO_TOKEN, prompt_ids)


def seen_tokens(context: jax.Array, new_tokens: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    """[B, V] bool: which ids occur in the context [B, T] or among the first `step` new tokens [B, N]."""
    written = jnp.arange(new_tokens.shape[1])[None, :] < step
    ids = jnp.concatenate([context, jnp.where(written, new_tokens, NO_TOKEN)], axis=1)  # [B, T + N]
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].set(True, mode="drop")


def process_logits(
    logits: jax.Array,
    step: jax.Array,
    context: jax.Array,
    new_tokens: jax.Array,
    eos_ids: jax.Array,
    *,
    min_new_tokens: int,
    repetition_penalty: jax.Array | None,
    forced_eos_ids: jax.Array | None = None,
    last_step: int = 0,
) -> jax.Array:
    """transformers' repetition-penalty, min-new-tokens and forced-eos processors on one step's logits
    [B, V] float32.

    step: how many new tokens exist ([] int32); context: `penalty_context` [B, T];
    new_tokens: [B, N] (entries at and after `step` are not yet written); eos_ids: [E]
    int32; min_new_tokens: static (0 = off); repetition_penalty: [] float32, or None = off;
    forced_eos_ids: [F] int32, or None = off: at step `last_step` (the last new token) only
    these ids stay possible (logit 0, every other -inf, as transformers sets them).
    """
    if repetition_penalty is not None:
        seen = seen_tokens(context, new_tokens, step, logits.shape[-1])
        penalised = jnp.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if min_new_tokens and eos_ids.shape[0]:
        is_eos = jnp.any(jnp.arange(logits.shape[-1])[:, None] == eos_ids[None, :], axis=-1)  # [V]
        logits = jnp.where((step < min_new_tokens) & is_eos[None, :], -jnp.inf, logits)
    if forced_eos_ids is not None:
        is_forced = jnp.any(jnp.arange(logits.shape[-1])[:, None] == forced_eos_ids[None, :], axis=-1)  # [V]
        logits = jnp.where(step == last_step, jnp.where(is_forced, 0.0, -jnp.inf)[None, :], logits)
    return logits
