"""Write HF-layout checkpoints: safetensors (single or sharded) and config.json, atomically.

Everything is written into a hidden temporary folder next to the target first and moved
into place only when complete, so a failed save never leaves a half-written checkpoint
that loads; stale weight files of an earlier save in the same folder are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from trlax.checkpoint.reader import SAFETENSORS_DTYPES

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_STALE_WEIGHTS = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                            r"pytorch_model(-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json)$")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "1MiB" (transformers' units)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size; use an int or a string like '5GB' or '500MB'")
    value, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(value * base ** "KMGT".index(unit[0]) * base)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write one safetensors file (header + raw little-endian bytes)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, array in tensors.items():
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {array.dtype}, which safetensors cannot store")
        header[key] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


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
    """Write tensors (+ whatever `write_extra(tmp_dir)` writes, e.g. config.json) atomically.

    Returns the written paths. Weight files of an earlier save in the folder that this
    save does not overwrite (other shards, a .bin) are removed so loaders cannot mix them.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained target {target} exists and is a file; pass a directory")
    target.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    tmp = Path(tempfile.mkdtemp(prefix=".trlax-save-", dir=target))
    try:
        if max_shard_size is None:
            write_safetensors(tmp / SAFE_WEIGHTS_NAME, tensors, metadata)
        else:
            shards = _shards(tensors, parse_size(max_shard_size))
            if len(shards) == 1:
                write_safetensors(tmp / SAFE_WEIGHTS_NAME, tensors, metadata)
            else:
                weight_map = {}
                for i, shard in enumerate(shards, start=1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    write_safetensors(tmp / name, shard, metadata)
                    weight_map.update(dict.fromkeys(shard, name))
                total = int(sum(a.nbytes for a in tensors.values()))
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        for old in target.iterdir():
            if old.is_file() and _STALE_WEIGHTS.match(old.name) and old.name not in written:
                old.unlink()
        for name in written:
            os.replace(tmp / name, target / name)
        return [target / name for name in written]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
