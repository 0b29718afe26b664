"""Read tensors one at a time from safetensors files (memory-mapped) or pytorch_model.bin.

safetensors is parsed here rather than through `safetensors.safe_open` because numpy has
no bfloat16 of its own: the header gives dtype, shape and byte offsets, and a memory map
plus `ml_dtypes` gives every dtype, slices included, with no copy until a tensor is used.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

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

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked, its data memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path} is corrupt or truncated: header length {header_len} "
                                      f"does not fit a file of {size} bytes; re-download or re-save it")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header ({e}); re-save it") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: unreadable header entry for {key!r}: {info!r}") from None
            if end - start != dtype.itemsize * int(np.prod(shape)) or self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path} is corrupt or truncated: tensor {key!r} needs bytes {start}..{end} of the data "
                    f"section but the file holds {size - self._data_start}; re-download or re-save it"
                )
            self._entries[key] = (dtype, shape, start, end)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        """A read-only view of the tensor in the memory map (no copy)."""
        dtype, shape, start, end = self._entries[key]
        count = (end - start) // dtype.itemsize
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + start).reshape(shape)

    def location(self, key: str) -> tuple[np.dtype, tuple[int, ...], int]:
        """(dtype, shape, offset of the first byte within the data section) of a tensor."""
        dtype, shape, start, _ = self._entries[key]
        return dtype, shape, start

    def read_bytes(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` within the data section, with one pread (no memory map)."""
        return os.pread(self._file.fileno(), length, self._data_start + offset)

    def close(self) -> None:
        # Views into the map may still be alive (e.g. in a caller's numpy array); mmap then
        # refuses to close and the map is released when the last view dies.
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
        self._file.close()


class TorchBinFile:
    """A legacy pytorch_model.bin (torch pickle), read with torch.load(mmap=True)."""

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
            self._state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{self.path} could not be read as a PyTorch checkpoint: {e}") from None
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self.get(key).dtype

    def get(self, key: str) -> np.ndarray:
        import torch

        tensor = self._state[key].detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._state = {}


class CheckpointReader:
    """All tensors of a checkpoint (one or many files) behind one key -> array lookup."""

    def __init__(self, files: list[Path]) -> None:
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for path in files:
                opened = SafetensorsFile(path) if str(path).endswith(".safetensors") else TorchBinFile(path)
                self._stack.callback(opened.close)
                for key in opened.keys():  # noqa: SIM118 - not a dict
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

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def nbytes(self, key: str) -> int:
        return int(np.prod(self.shape(key))) * self._where[key].dtype(key).itemsize

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def file_of(self, key: str) -> SafetensorsFile | TorchBinFile:
        """The opened file that holds `key`."""
        return self._where[key]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)
