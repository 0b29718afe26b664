"""Checks the commands run before any real work: output folders they can write, batches that can fit.

A command that trains for an hour and then cannot write its results, or that dies in an
out-of-memory traceback halfway through its first step, should have refused at once with
one line: these checks do that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

import jax

from trlax.checkpoint.writer import parse_size
from trlax.errors import TrlaxError

FLOAT32_BYTES = 4


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Make sure `path` can be created (with its parents) and written to, and leave nothing behind.

    The folders it had to create are removed again, so a command that fails later (a
    model that does not load) leaves no empty output folder. Raises TrlaxError naming the
    folder and the reason: a file in the way, a read-only or virtual file system such as
    /proc, no permission.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrlaxError(f"{flag} {path} exists and is not a folder; pass a folder")
    missing, existing = [], path.absolute()
    while not existing.exists():  # the folders to create, innermost first
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise TrlaxError(f"{flag} {path} cannot be created: {existing} is not a folder")
    try:
        for folder in reversed(missing):
            folder.mkdir()
        probe = path / f".trlax-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrlaxError(f"{flag} {path} cannot be written: {e.strerror or e}; pass a folder you can write "
                         "to") from None
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):  # only the empty folders made here
                folder.rmdir()
    return path


def shard_size(text: str) -> int | str:
    """argparse type of --max-shard-size: a size ("5GB", "500MB") or a number of bytes, checked."""
    size = int(text) if text.isdigit() else text
    try:
        parse_size(size)
    except TrlaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return size


def memory_limit() -> tuple[int, str]:
    """(bytes, what they are) a run can use at most: the accelerators' memory, or the host's RAM."""
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            return int(sum(limits)), f"the memory of {len(devices)} {devices[0].platform} device(s)"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's RAM"


def _first(config: Any, names: tuple[str, ...]) -> int:
    return int(next(getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)))


# Per token, what a step keeps for every row of the batch besides the rows being computed: the experience
# (9 float32 entries: log-probs, values, rewards, advantages, ...) and the 4 int32 model inputs.
EXPERIENCE_ENTRIES = 13


def step_bytes_lower_bound(config: Any, batch_size: int, seq_len: int, mini_batch_size: int | None = None) -> int:
    """Bytes one PPO step over `batch_size` sequences of `seq_len` tokens needs at least (float32).

    Per token: the policy's and the reference's logits and their log-probabilities (3 V),
    and per layer what the backward pass keeps: about 8 H of projections, MLP and norm
    activations plus the attention row (heads x S). That is about half of what XLA
    allocates for the step (measured: 8 KB per token for the demo's model, V=31, H=64,
    2 layers, S=16, at batch 1024, where this gives 4.9 KB), so a batch over it cannot fit.
    With `mini_batch_size` (the forwards and updates run over chunks of that many rows, as `trlax ppo`'s do),
    that cost is the chunk's, and every other row holds its experience (`EXPERIENCE_ENTRIES` per token).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = _first(text, ("vocab_size",))
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    layers = _first(text, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(text, ("num_attention_heads", "n_head", "num_heads"))
    per_token = 3 * vocab + layers * (8 * hidden + heads * seq_len)
    computed = batch_size if mini_batch_size is None else min(mini_batch_size, batch_size)
    return seq_len * (computed * per_token + (batch_size - computed) * EXPERIENCE_ENTRIES) * FLOAT32_BYTES


def check_batch_fits(config: Any, batch_size: int, seq_len: int, flag: str = "--batch-size",
                     mini_batch_size: int | None = None) -> None:
    """TrlaxError before anything is allocated when one step of this batch (computed in chunks of
    `mini_batch_size` rows, None: all at once) cannot fit in memory."""
    need = step_bytes_lower_bound(config, batch_size, seq_len, mini_batch_size)
    limit, what = memory_limit()
    if need > limit:
        if step_bytes_lower_bound(config, 1, seq_len) > limit:
            fix = "even one sequence that long does not fit: use a smaller --max-new-tokens (or shorter prompts)"
        elif mini_batch_size is not None and step_bytes_lower_bound(config, batch_size, seq_len, 1) <= limit:
            fix = f"use a smaller --mini-batch-size (the rows computed at once) or {flag}"
        else:
            fix = f"use a smaller {flag}"
        raise TrlaxError(f"{flag} {batch_size} cannot fit: one PPO step over {batch_size} sequences of {seq_len} "
                         f"tokens needs more than {need / 1e9:,.1f} GB, and {what} is {limit / 1e9:,.1f} GB; {fix}")
