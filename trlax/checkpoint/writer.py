"""Write HF-layout checkpoints: safetensors (single or sharded) and config.json, atomically.

The whole folder is replaced in one step (`trlax.checkpoint.atomic`): everything is
written and fsynced in a temporary folder beside the target, which is then swapped in, so
at every instant the target holds the complete old or the complete new checkpoint. Other
files of the old folder (a tokenizer, a README) are carried over; its weight files are
not, so loaders cannot mix an old shard with new ones, nor its generation_config.json (a save
writes the model's own, or none: an old one would hand its settings to another model).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from trlax.checkpoint.atomic import replacing_folder
from trlax.checkpoint.dtypes import is_float
from trlax.checkpoint.reader import SAFETENSORS_DTYPES
from trlax.errors import CheckpointWriteError, TrlaxError

logger = logging.getLogger("trlax")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Entries of an earlier save that a new save drops instead of carrying over: weight files, a PEFT
# adapter's (whose config makes loaders read the folder as an adapter), generation settings, and the
# staging folders that trlax <= 0.2 left inside the target when a save crashed.
_STALE_ENTRIES = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                            r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json|"
                            r"adapter_model\.(safetensors|bin)|adapter_config\.json|generation_config\.json|"
                            r"\.trlax-save-.*)$")
# An Orbax model folder's own entries (`trlax.checkpoint.convert`): a save into such a folder drops them too, or
# `load_orbax` and `trlax convert` would go on reading the old Orbax params beside the new config.json.
ORBAX_MODEL_MARKER = "trlax_orbax.json"
ORBAX_PARAMS_DIR = "params"


def is_orbax_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `to_orbax` (it holds the marker)."""
    return (Path(path) / ORBAX_MODEL_MARKER).is_file()


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "1MiB" (transformers' units: a lower-case final
    "b", as in "5Gb", counts bits)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise TrlaxError(f"max_shard_size must be at least 1 byte; got {size}")
        return size
    if not isinstance(size, str):
        raise TrlaxError(f"max_shard_size {size!r} is not a size; use an int or a string like '5GB' or '500MB'")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise TrlaxError(f"max_shard_size {size!r} is not a size; use an int or a string like '5GB' or '500MB'")
    value, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit.upper() else 1000
    size_bytes = int(value * base ** "KMGT".index(unit[0].upper()) * base)
    return size_bytes // 8 if unit.endswith("b") and "i" not in unit.lower() else size_bytes


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write one safetensors file (header + raw little-endian bytes); tensors holding NaN or inf are written
    as they are, with a warning naming them (a diverged run is still worth inspecting)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, array in tensors.items():
        if array.dtype not in _DTYPE_NAMES:
            raise TrlaxError(f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot store")
        header[key] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        non_finite = []
        for key, array in tensors.items():  # each tensor read once, in order (a multi-host save gathers it here)
            data = np.ascontiguousarray(array)
            if is_float(data.dtype) and not np.isfinite(data).all():
                non_finite.append(key)
            f.write(data.tobytes())
    if non_finite:
        logger.warning("%s: %d tensor(s) hold NaN or inf values, e.g. %s; saved as they are",
                       path.name, len(non_finite), non_finite[:3])


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in key order, as transformers does: a shard closes when the next tensor overflows it."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = array
        size += array.nbytes
    return shards


def write_checkpoint_dir(
    save_directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    write_extra: Callable[[Path], None] | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write tensors (+ whatever `write_extra(tmp_dir)` writes, e.g. config.json) as the folder
    `save_directory`, replacing it atomically (see the module docstring).

    Returns the written paths. Weight files of an earlier save in the folder (other shards,
    a .bin), a PEFT adapter's files, generation_config.json and an Orbax model's marker and params
    are dropped (each save writes its own); its other files (tokenizer, README) are kept. Raises
    CheckpointError when the folder cannot be replaced atomically (a file, a mount point, an
    unwritable parent folder).
    """
    metadata = {"format": "pt", **(metadata or {})}
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)

    def write(folder: Path) -> None:
        write_weights(folder, tensors, max_bytes, metadata)
        if write_extra is not None:
            write_extra(folder)

    return write_folder(save_directory, write)


def write_folder(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> list[Path]:
    """`write(tmp_dir)`'s files as the folder `save_directory`, replacing it atomically; the old folder's
    weight files (an Orbax model folder's too) and generation settings are dropped and its other files kept (see
    the module docstring).
    Returns the written paths."""
    orbax_entries = (ORBAX_MODEL_MARKER, ORBAX_PARAMS_DIR) if is_orbax_model(save_directory) \
        else ()

    def carried_over(name: str) -> bool:
        return not (_STALE_ENTRIES.match(name) or name in orbax_entries)

    with replacing_folder(save_directory, carry_over=carried_over) as tmp:
        try:
            write(tmp)
        except OSError as e:  # a full disk, a file size limit: safetensors' error names no file
            raise CheckpointWriteError(f"cannot write {save_directory}: {e.strerror or e}; it is left as it was "
                                       "(free space, or save to another disk)") from e
        written = sorted(p.name for p in tmp.iterdir())
    target = Path(os.path.realpath(save_directory))
    return [target / name for name in written]


def write_weights(folder: Path, tensors: Mapping[str, np.ndarray], max_bytes: int | None,
                  metadata: Mapping[str, str]) -> None:
    """model.safetensors, or shards of at most `max_bytes` plus model.safetensors.index.json."""
    shards = [dict(tensors)] if max_bytes is None else _shards(tensors, max_bytes)
    if len(shards) == 1:
        write_safetensors(folder / SAFE_WEIGHTS_NAME, tensors, metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = int(sum(a.nbytes for a in tensors.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
