"""Fill a param tree from a checkpoint, strictly: every tensor accounted for, or an error.

All names and shapes are checked before any data is read, so a bad checkpoint fails
fast and never yields a partly loaded model. Tensors are then read one at a time into
fresh buffers, converted (transpose, dtype) and placed on device, each buffer dropped
before the next read, so the host never holds the state dict twice: loading peaks at
about the final params plus one tensor in flight (benchmarks/load_memory.py). A stacked
expert param (see `trlax.checkpoint.naming`) is assembled from its per-expert tensors
first, then placed.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from trlax.checkpoint.naming import TensorRule, set_path
from trlax.checkpoint.reader import CheckpointReader, aligned_empty
from trlax.checkpoint.slices import tensor_slices
from trlax.errors import CheckpointError

logger = logging.getLogger("trlax")

# Show a progress bar when a load reads more than this many bytes.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024
# A tensor is read and converted this many bytes at a time (see `read_converted`).
BLOCK_BYTES = 4 * 1024 * 1024

Placer = Callable[[tuple[str, ...], np.ndarray], jax.Array]


def _default_place(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
    return jax.device_put(array)


@dataclass
class LoadReport:
    """What a load did besides filling the table."""

    missing_optional: list[str] = field(default_factory=list)  # optional keys absent (initialise them)
    skipped: list[str] = field(default_factory=list)  # checkpoint keys knowingly not used


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _stored_names(checkpoint_keys: Iterable[str], table: Mapping[str, TensorRule], base_model_prefix: str,
                  optional_prefixes: tuple[str, ...]) -> dict[str, str]:
    """Model key -> checkpoint key. Usually the same; but a checkpoint saved from the bare
    base model (GPT2Model, not GPT2LMHeadModel: `h.0.attn...` instead of
    `transformer.h.0.attn...`, as the original `gpt2` hub files are) lacks the family's
    `base_model_prefix`, which transformers adds back on load; so does this."""
    checkpoint_keys = list(checkpoint_keys)
    prefix = base_model_prefix + "."
    if not base_model_prefix or any(k.startswith(prefix) for k in checkpoint_keys):
        return {k: k for k in checkpoint_keys}
    names = {}
    for key in checkpoint_keys:
        keep = key in table or (optional_prefixes and key.startswith(optional_prefixes))
        names[key if keep else prefix + key] = key
    return names


def read_converted(reader: CheckpointReader, key: str, rule: TensorRule) -> np.ndarray:
    """Checkpoint tensor `key` in the param's layout and dtype (`rule.shape`, `rule.dtype`).

    The result is one fresh buffer, aligned so that `jax.device_put` on the CPU backend
    adopts it without a copy; it is filled a block of rows at a time (transposed and cast
    per block), so the only memory besides it is one block of BLOCK_BYTES.
    """
    dtype = np.dtype(rule.dtype)
    out = aligned_empty(int(np.prod(rule.shape)) * dtype.itemsize).view(dtype).reshape(rule.shape)
    shape = reader.shape(key)
    if not shape:  # a scalar
        out[...] = reader.get(key)
        return out
    rows_per_block = max(BLOCK_BYTES // max(reader.nbytes(key) // max(shape[0], 1), 1), 1)
    for start in range(0, shape[0], rows_per_block):
        stop = min(start + rows_per_block, shape[0])
        block = rule.to_flax(reader.read_rows(key, start, stop))
        if rule.transpose:  # a 2-D kernel: HF rows are its columns
            out[:, start:stop] = block
        else:
            out[start:stop] = block
    return out


def load_params(
    reader: CheckpointReader,
    table: Mapping[str, TensorRule],
    *,
    source: str,
    base_model_prefix: str = "",
    optional_prefixes: tuple[str, ...] = (),
    ignored: Iterable[str] = (),
    place: Placer = _default_place,
    slice_reads: bool = False,
) -> tuple[dict[str, Any], LoadReport]:
    """Read every tensor in `table` from `reader` into a nested param dict.

    base_model_prefix: the family's backbone name in the state dict ("transformer", "model");
        a checkpoint of the bare backbone (keys without it) is read as transformers reads it.
    optional_prefixes: HF key prefixes that may be absent (TRL's "v_head."): they are
        reported in `LoadReport.missing_optional` instead of raising.
    ignored: regexes of checkpoint keys to skip knowingly (buffers, tied copies, a value
        head when loading a plain LM); they are listed in `LoadReport.skipped`.
    slice_reads: hand `place` a `trlax.checkpoint.slices.TensorSlices` (indexable, reads
        only the boxes asked for) instead of the whole array wherever the file allows it;
        for placers that only index their input, like `trlax.sharding.make_placer`'s.
    Raises CheckpointError for a missing, unexpected or mis-shaped tensor, or an integer
    tensor where a floating-point param belongs.
    """
    ignored_res = [re.compile(p) for p in ignored]
    report = LoadReport()
    stored_as = _stored_names(reader.keys(), table, base_model_prefix, optional_prefixes)  # model key -> checkpoint key
    present = set(stored_as)
    unexpected = []
    for key in present - table.keys():
        if any(r.match(key) or r.match(stored_as[key]) for r in ignored_res):
            report.skipped.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in table if k not in present]
    report.missing_optional = [k for k in missing if k.startswith(optional_prefixes) and optional_prefixes]
    missing = [k for k in missing if k not in report.missing_optional]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} is missing {len(missing)} tensor(s) the model needs: {_preview(missing)}. "
            "Is the config.json the one these weights were saved with?"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source} has {len(unexpected)} tensor(s) this model does not use: {_preview(unexpected)}. "
            "The checkpoint is probably of another architecture or size than its config.json says."
        )
    wrong = [
        f"{key}: checkpoint {reader.shape(stored_as[key])} vs model {rule.hf_shape}"
        for key, rule in table.items()
        if key in present and tuple(reader.shape(stored_as[key])) != rule.hf_shape
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {source} has {len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:8])}. "
            "The config.json does not match these weights."
        )
    not_float = [
        f"{key} ({reader.dtype(stored_as[key]).name} in {reader.file_of(stored_as[key])})"
        for key, rule in table.items()
        if key in present and jnp.issubdtype(rule.dtype, jnp.inexact) and reader.dtype(stored_as[key]).kind in "iub"
    ]
    if not_float:
        raise CheckpointError(
            f"checkpoint {source} stores {len(not_float)} floating-point param(s) as integers or booleans: "
            f"{'; '.join(not_float[:8])}. The file is corrupt or not a model checkpoint; re-save it."
        )
    to_read = [k for k in table if k in present]
    slices = Counter(table[k].path for k in to_read if table[k].index)
    total = sum(reader.nbytes(stored_as[k]) for k in to_read)
    params: dict[str, Any] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {source}",
              disable=total < PROGRESS_MIN_BYTES, leave=False) as bar:
        stacks: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}  # stacked param -> (buffer, slices left)
        for key in to_read:
            rule = table[key]
            array = None
            if slice_reads and not rule.index:  # a stacked expert slice is assembled whole on the host
                array = tensor_slices(reader, stored_as[key], rule.transpose, rule.dtype)
            if array is None:
                array = read_converted(reader, stored_as[key], rule)
            bar.update(reader.nbytes(stored_as[key]))
            if not rule.index:
                set_path(params, rule.path, place(rule.path, array))
                continue
            # One slice of a stacked param: assembled on the host, placed once complete.
            buffer, left = stacks.get(rule.path) or (np.empty(rule.param_shape, rule.dtype), slices[rule.path])
            buffer[rule.index] = array
            if left == 1:
                set_path(params, rule.path, place(rule.path, stacks.pop(rule.path, (buffer,))[0]))
            else:
                stacks[rule.path] = (buffer, left - 1)
    if report.skipped:
        logger.info("%s: skipped %d checkpoint tensor(s) this model does not use: %s",
                    source, len(report.skipped), _preview(report.skipped))
    return params, report
