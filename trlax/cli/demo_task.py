"""The `trlax demo` task: prompts, a reward a person reads at a glance, and the embedded tiny model.

The embedded default needs no download: a character-level vocabulary (a start token,
space, a-z and `.!?`), a randomly initialised 2-layer GPT-2 with a value head, and the
rule "reward = fraction of the reply's characters that are vowels (a, e, i, o, u)".

On a real checkpoint (`trlax demo --model ...`) the same rule is applied to token ids:
the rewarded tokens are those whose text (from the checkpoint's tokenizer, when one
loads offline) is made only of vowels, e.g. "a", " e", "ou"; without a tokenizer, every
token id divisible by 5. In every case the score is the number of rewarded tokens in
the reply divided by `max_new_tokens`, so stopping early (at an eos) never pays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from trlax.errors import TrlaxError

Array = jax.Array

START = "^"  # the start-of-text token of the embedded vocabulary (shown as "^")
CHARS = START + " abcdefghijklmnopqrstuvwxyz.!?"  # id = index; 31 tokens
VOWELS = "aeiou"
CONSONANTS = "bcdfghjklmnpqrstvwxyz"
# Real-checkpoint prompts (used when a tokenizer loads): short English openers.
OPENERS = ("The", "Once upon a time", "I think", "Today", "My favourite", "Here is", "She said", "We")


@dataclass(frozen=True)
class Task:
    """What the demo generates and how it is scored.

    target: [V] float32, 1.0 for rewarded tokens. sample_prompts(rng, batch) returns
    left-padded prompt ids and mask, both [B, P] int32. decode(ids) is the text of a list
    of ids. eos_ids: tokens that end a reply (() = replies always have max_new_tokens).
    """

    description: str
    target: np.ndarray
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    sample_prompts: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    decode: Callable[[Sequence[int]], str]
    legend: str = ""  # how to read decoded samples, if they need it


# --- the embedded default -------------------------------------------------------------
def encode_chars(text: str) -> list[int]:
    """Ids of `text` in the embedded vocabulary (ValueError on a character it lacks)."""
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise TrlaxError(f"characters {unknown} are not in the demo vocabulary {CHARS!r}")
    return [CHARS.index(c) for c in text]


def decode_chars(ids: Sequence[int]) -> str:
    return "".join(CHARS[int(i)] for i in ids)


def char_task(max_new_tokens: int = 12, prompt_letters: int = 3) -> Task:
    """The embedded task: prompt = start token + 3 random consonants; reward = vowel fraction of the reply."""

    def sample_prompts(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        letters = rng.choice([CHARS.index(c) for c in CONSONANTS], size=(batch, prompt_letters))
        ids = np.concatenate([np.zeros((batch, 1), np.int32), letters], axis=1).astype(np.int32)
        return ids, np.ones_like(ids)

    target = np.array([c in VOWELS for c in CHARS], np.float32)
    return Task(
        description=f"fraction of the {max_new_tokens} reply characters that are vowels (a, e, i, o, u)",
        target=target, max_new_tokens=max_new_tokens, eos_ids=(), pad_id=0, sample_prompts=sample_prompts,
        decode=decode_chars, legend=f"{START} is the start-of-text token")


def tiny_gpt2_config(n_layer: int = 2, n_embd: int = 64, n_head: int = 4) -> transformers.GPT2Config:
    """The embedded policy's config: GPT-2 over the character vocabulary, no dropout (deterministic PPO)."""
    return transformers.GPT2Config(
        vocab_size=len(CHARS), n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)


# --- real checkpoints -----------------------------------------------------------------
def load_tokenizer(source: str, vocab_size: int) -> Any | None:
    """The checkpoint's tokenizer if a usable one loads without the network, else None.

    transformers may build an empty tokenizer from a folder without tokenizer files (one
    token, nothing encodes), so it counts only if it covers at least half of the model's
    vocabulary and encodes every prompt opener.
    """
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a missing tokenizer is expected here, not worth transformers' warnings
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
        usable = len(tokenizer) * 2 >= vocab_size and all(tokenizer(text)["input_ids"] for text in OPENERS)
    except Exception:  # noqa: BLE001 - any failure means "no usable tokenizer": fall back to ids
        return None
    finally:
        logger.setLevel(level)
    return tokenizer if usable else None


def checkpoint_task(config: transformers.PretrainedConfig, tokenizer: Any | None, max_new_tokens: int = 12) -> Task:
    """The vowel rule over a real checkpoint's token ids (see the module docstring)."""
    vocab = int(config.get_text_config().vocab_size)
    eos = config.get_text_config().eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    eos_ids = tuple(i for i in eos_ids if 0 <= i < vocab)
    pad = config.get_text_config().pad_token_id
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    if tokenizer is None:
        return Task(
            description=f"fraction of the {max_new_tokens} reply tokens whose id is divisible by 5 (no tokenizer "
                        "found, so the vowel rule falls back to ids)",
            target=(np.arange(vocab) % 5 == 0).astype(np.float32), max_new_tokens=max_new_tokens, eos_ids=eos_ids,
            pad_id=pad_id, sample_prompts=_random_id_prompts(vocab, eos_ids),
            decode=lambda ids: " ".join(str(int(i)) for i in ids))
    texts = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    target = np.zeros(vocab, np.float32)
    for i, token in enumerate(texts):
        text = tokenizer.convert_tokens_to_string([token]).strip().lower() if token else ""
        target[i] = float(bool(text) and all(c in VOWELS for c in text))
    return Task(
        description=f"fraction of the {max_new_tokens} reply tokens made only of vowels (a, e, i, o, u), "
                    f"{int(target.sum())} of the {vocab} tokens",
        target=target, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
        sample_prompts=_opener_prompts(tokenizer, pad_id),
        decode=lambda ids: tokenizer.decode([int(i) for i in ids if int(i) < len(tokenizer)]))


def _random_id_prompts(vocab: int, eos_ids: tuple[int, ...]) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    allowed = np.setdiff1d(np.arange(vocab), eos_ids)  # prompts never hold an eos

    def sample(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        ids = rng.choice(allowed, size=(batch, 4)).astype(np.int32)
        return ids, np.ones_like(ids)

    return sample


def _opener_prompts(tokenizer: Any, pad_id: int) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in OPENERS]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(encoded):  # left padding: generation appends after the last column
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = 1

    def sample(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        rows = rng.integers(0, len(OPENERS), size=batch)
        return ids[rows], mask[rows]

    return sample


# --- scoring (jit-friendly) -----------------------------------------------------------
def reply_mask(reply: Array, eos_ids: tuple[int, ...]) -> Array:
    """[B, N] int32: 1 for reply tokens up to and including the first eos (all ones without eos)."""
    is_eos = jnp.zeros(reply.shape, bool)
    for eos in eos_ids:
        is_eos = is_eos | (reply == eos)
    ended_before = jnp.cumsum(is_eos, axis=1) - is_eos  # eos count strictly before each position
    return (ended_before == 0).astype(jnp.int32)


def score_replies(target: Array, reply: Array, mask: Array, max_new_tokens: int) -> Array:
    """[B] float32: rewarded tokens among the real reply tokens [B, N], divided by max_new_tokens."""
    hits = jnp.take(target, reply, axis=0) * mask  # [B, N]
    return hits.sum(axis=1) / max_new_tokens
