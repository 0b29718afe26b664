"""Read tensors one at a time from safetensors files or pytorch_model.bin.

safetensors is parsed here rather than through `safetensors.safe_open` because numpy has
no bfloat16 of its own: the header gives dtype, shape and byte offsets, and `ml_dtypes`
gives every dtype. The header is checked as strictly as the safetensors library checks
it (tensors packed back to back from offset 0 to the end of the file, sizes matching
shapes, nothing overlapping, no trailing bytes), so a damaged or hostile file fails with
the file and tensor named instead of yielding garbage weights. Each tensor is read with
one positioned read into a fresh aligned buffer, not through a memory map: nothing of the
file stays mapped behind the arrays, so loading never holds a tensor twice for long.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from trlax.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit
# Buffers are aligned for SIMD loads and so that JAX's CPU backend may adopt them without a copy.
BUFFER_ALIGNMENT = 64


class TensorEntry(NamedTuple):
    """Where one tensor lies in a safetensors file: dtype, shape, absolute byte range [start, end)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of `nbytes` whose data starts on a BUFFER_ALIGNMENT boundary."""
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[skip:skip + nbytes]


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise CheckpointError(f"key {duplicate!r} appears twice")
    return dict(pairs)


def parse_json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object with unique keys, else CheckpointError naming `what` (a file, a header)."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{what} is not valid JSON ({e}); re-download or re-save it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} must be a JSON object, not a {type(value).__name__}; re-save it")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, key: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """dtype, shape and (data-relative) offsets of one header entry, type-checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: tensor {key!r} has an unreadable header entry {info!r}; "
                              "expected {dtype, shape, data_offsets}")
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']!r}, which trlax cannot read "
                              f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r}; a shape is a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {offsets!r}; "
                              "they must be two integers >= 0 (start, end)")
    return SAFETENSORS_DTYPES[info["dtype"]], tuple(shape), offsets[0], offsets[1]


class SafetensorsFile:
    """One .safetensors file: its header parsed and validated; tensors read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            self._entries = self._read_header(self._file)
        except BaseException:
            self._file.close()
            raise

    def _read_header(self, f: Any) -> dict[str, TensorEntry]:
        size = self.path.stat().st_size
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{self.path} is not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{self.path} is corrupt or truncated: header length {header_len} "
                                  f"does not fit a file of {size} bytes; re-download or re-save it")
        header = parse_json_object(f.read(header_len), f"the safetensors header of {self.path}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings; got {metadata!r}")
        self.metadata: dict[str, str] = metadata
        data_start = 8 + header_len
        parsed = {key: _parse_entry(self.path, key, info) for key, info in header.items()}
        # As the safetensors library: sorted by offsets, each tensor starts where the previous
        # ended (no gap, no overlap), its byte count is its shape's, and the last one ends
        # exactly at the end of the file.
        entries: dict[str, TensorEntry] = {}
        position = 0
        for key, (dtype, shape, start, end) in sorted(parsed.items(), key=lambda item: item[1][2:]):
            if start != position or end < start:
                problem = ("overlaps the previous tensor" if start < position else
                           "leaves a gap after the previous tensor" if start > position else "ends before it starts")
                raise CheckpointError(f"{self.path} is corrupt: tensor {key!r} has data_offsets [{start}, {end}] and "
                                      f"{problem} (expected start {position}); re-download or re-save it")
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
            if end - start != nbytes:
                raise CheckpointError(f"{self.path} is corrupt: tensor {key!r} of shape {list(shape)} and dtype "
                                      f"{dtype.name} needs {nbytes} bytes but data_offsets [{start}, {end}] span "
                                      f"{end - start}; re-download or re-save it")
            if data_start + end > size:
                raise CheckpointError(f"{self.path} is corrupt or truncated: tensor {key!r} needs bytes {start}..{end} "
                                      f"of the data section but the file holds {size - data_start}; "
                                      "re-download or re-save it")
            entries[key] = TensorEntry(dtype, shape, data_start + start, data_start + end)
            position = end
        if data_start + position != size:
            raise CheckpointError(f"{self.path} is corrupt: {size - data_start - position} trailing byte(s) after "
                                  "the last tensor; re-download or re-save it")
        return {key: entries[key] for key in header}  # header order

    def keys(self) -> list[str]:
        return list(self._entries)

    def entry(self, key: str) -> TensorEntry:
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key].dtype

    def read_bytes(self, start: int, nbytes: int) -> np.ndarray:
        """Bytes [start, start + nbytes) of the file into a fresh aligned uint8 buffer."""
        buffer = aligned_empty(nbytes)
        view = memoryview(buffer)
        self._file.seek(start)
        done = 0
        while done < nbytes:  # a single read returns at most ~2 GiB on Linux
            got = self._file.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path} was truncated while being read (at byte {start + done}); "
                                      "was it overwritten during the load?")
            done += got
        return buffer

    def get(self, key: str) -> np.ndarray:
        """The tensor, in a fresh writable array of its stored dtype and shape."""
        dtype, shape, start, end = self._entries[key]
        return self.read_bytes(start, end - start).view(dtype).reshape(shape)

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's leading axis (contiguous on disk), in a fresh array."""
        dtype, shape, first, end = self._entries[key]
        row_bytes = (end - first) // shape[0] if shape[0] else 0
        data = self.read_bytes(first + start * row_bytes, (stop - start) * row_bytes)
        return data.view(dtype).reshape((stop - start, *shape[1:]))

    def location(self, key: str) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, offset of its first byte in the file) of a tensor; see `read_bytes`."""
        dtype, shape, start, _ = self._entries[key]
        return dtype, shape, start

    def close(self) -> None:
        self._file.close()


class TorchBinFile:
    """A pytorch_model.bin (torch pickle), read with torch.load(weights_only=True): no code runs.

    Zip-format files (torch >= 1.6) are memory-mapped; older non-zip ("legacy") files cannot
    be, and are read whole, as transformers reads them.
    """

    def __init__(self, path: Path) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path} is a PyTorch pickle (pytorch_model.bin); reading it needs torch: "
                "pip install 'trlax[torch]', or convert the checkpoint to safetensors"
            ) from None
        self.path = Path(path)
        try:
            mmap = zipfile.is_zipfile(self.path)
            self._state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{self.path} could not be read as a PyTorch checkpoint: {e}") from None
        if not isinstance(self._state, dict) or not all(isinstance(t, torch.Tensor) for t in self._state.values()):
            raise CheckpointError(f"{self.path} is not a PyTorch state dict (a dict of tensor names to tensors)")
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        import torch  # present: __init__ needed it

        tensor = self._state[key]
        if tensor.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return torch.empty(0, dtype=tensor.dtype).numpy().dtype

    def get(self, key: str) -> np.ndarray:
        import torch

        tensor = self._state[key].detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's leading axis (a view where the storage allows)."""
        import torch

        tensor = self._state[key][start:stop].detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._state = {}


class CheckpointReader:
    """All tensors of a checkpoint (one or many files) behind one key -> array lookup.

    A key stored in two files is refused (which copy wins would be arbitrary).
    """

    def __init__(self, files: list[Path]) -> None:
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for path in files:
                opened = SafetensorsFile(path) if str(path).endswith(".safetensors") else TorchBinFile(path)
                self._stack.callback(opened.close)
                for key in opened.keys():  # noqa: SIM118 - not a dict
                    if key in self._where:
                        raise CheckpointError(f"tensor {key!r} is stored twice, in {self._where[key].path} and in "
                                              f"{opened.path}; the checkpoint is corrupt, re-save it")
                    self._where[key] = opened
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        """The file holding `key`."""
        return self._where[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._where[key].dtype(key))

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key))) * self.dtype(key).itemsize

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of tensor `key`'s leading axis (`key` not a scalar)."""
        return self._where[key].read_rows(key, start, stop)

    def opened_file(self, key: str) -> SafetensorsFile | TorchBinFile:
        """The opened file that holds `key`."""
        return self._where[key]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)
