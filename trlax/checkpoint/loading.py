"""Fill a param tree from a checkpoint, strictly: every tensor accounted for, or an error.

All names and shapes are checked before any data is read, so a bad checkpoint fails
fast and never yields a partly loaded model. Tensors are then read one at a time
(memory-mapped), converted (transpose, dtype) and placed on device, so the host never
holds the whole state dict twice.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from trlax.checkpoint.naming import TensorRule, set_path
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.slices import tensor_slices
from trlax.errors import CheckpointError

logger = logging.getLogger("trlax")

# Show a progress bar when a load reads more than this many bytes.
PROGRESS_MIN_BYTES = 256 * 1024 * 1024

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


def _stored_names(
    checkpoint_keys: Iterable[str], table: Mapping[str, TensorRule], optional_prefixes: tuple[str, ...]
) -> dict[str, str]:
    """Model key -> checkpoint key. Usually the same; but a checkpoint saved from the bare
    base model (GPT2Model, not GPT2LMHeadModel: `h.0.attn...` instead of
    `transformer.h.0.attn...`, as the original `gpt2` hub files are) lacks the base-model
    prefix, which transformers adds back on load; so does this."""
    checkpoint_keys = list(checkpoint_keys)
    heads = Counter(k.split(".", 1)[0] for k in table if not (optional_prefixes and k.startswith(optional_prefixes)))
    if not heads:
        return {k: k for k in checkpoint_keys}
    prefix, count = heads.most_common(1)[0]
    if count * 2 < len(table) or any(k.startswith(prefix + ".") for k in checkpoint_keys):
        return {k: k for k in checkpoint_keys}
    names = {}
    for key in checkpoint_keys:
        keep = key in table or (optional_prefixes and key.startswith(optional_prefixes))
        names[key if keep else f"{prefix}.{key}"] = key
    return names


def load_params(
    reader: CheckpointReader,
    table: Mapping[str, TensorRule],
    *,
    source: str,
    optional_prefixes: tuple[str, ...] = (),
    ignored: Iterable[str] = (),
    place: Placer = _default_place,
    slice_reads: bool = False,
) -> tuple[dict[str, Any], LoadReport]:
    """Read every tensor in `table` from `reader` into a nested param dict.

    optional_prefixes: HF key prefixes that may be absent (TRL's "v_head."): they are
        reported in `LoadReport.missing_optional` instead of raising.
    ignored: regexes of checkpoint keys to skip knowingly (buffers, tied copies, a value
        head when loading a plain LM); they are listed in `LoadReport.skipped`.
    slice_reads: hand `place` a `trlax.checkpoint.slices.TensorSlices` (indexable, reads
        only the boxes asked for) instead of the whole array wherever the file allows it;
        for placers that only index their input, like `trlax.sharding.make_placer`'s.
    Raises CheckpointError for a missing, unexpected or mis-shaped tensor.
    """
    ignored_res = [re.compile(p) for p in ignored]
    report = LoadReport()
    stored_as = _stored_names(reader.keys(), table, optional_prefixes)  # model key -> checkpoint key
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
    to_read = [k for k in table if k in present]
    total = sum(reader.nbytes(stored_as[k]) for k in to_read)
    params: dict[str, Any] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {source}",
              disable=total < PROGRESS_MIN_BYTES, leave=False) as bar:
        for key in to_read:
            rule = table[key]
            array = tensor_slices(reader, stored_as[key], rule.transpose, rule.dtype) if slice_reads else None
            if array is None:
                array = np.asarray(rule.to_flax(reader.get(stored_as[key])), dtype=rule.dtype)
            set_path(params, rule.path, place(rule.path, array))
            bar.update(reader.nbytes(stored_as[key]))
    if report.skipped:
        logger.info("%s: skipped %d checkpoint tensor(s) this model does not use: %s",
                    source, len(report.skipped), _preview(report.skipped))
    return params, report
