"""Read only the bytes a host needs: safetensors tensors read box by box, not whole.

With a mesh, `jax.make_array_from_callback` asks each process only for the slices of its
own devices. A `TensorSlices` answers such a request by reading just the byte ranges of
that box from the file: in the row-major layout safetensors uses, a box is one
contiguous run per index of its leading dims (the trailing dims the box covers whole are
contiguous with each other). On a pod each host so reads about its share of a sharded
checkpoint, plus the replicated tensors whole, instead of every tensor (levanter's
`hf_checkpoints.py` reads per device the same way).

Bytes are read with `os.pread`, not through the memory map, so `READ_COUNTER` (and the
kernel's per-process read counters) see exactly what a process read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trlax.checkpoint.reader import CheckpointReader, SafetensorsFile
from trlax.errors import TrlaxError, TrlaxTypeError

Box = tuple[tuple[int, int], ...]  # (start, stop) per dim


@dataclass
class ReadCounter:
    """Bytes and read calls of this process's slice reads (since the last `reset`)."""

    bytes: int = 0
    reads: int = 0

    def reset(self) -> None:
        self.bytes = self.reads = 0


READ_COUNTER = ReadCounter()


def _box(index: Sequence[Any], shape: tuple[int, ...]) -> Box:
    """(start, stop) per dim from an index of slices (as `make_array_from_callback` passes)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    box = []
    for item, dim in zip(index, shape, strict=True):
        if not isinstance(item, slice):
            raise TrlaxTypeError(f"slice reads take a tuple of slices; got {item!r}")
        start, stop, step = item.indices(dim)
        if step != 1:
            raise TrlaxError(f"slice reads need contiguous slices; got step {step}")
        box.append((start, max(start, stop)))
    return tuple(box)


def read_box(file: SafetensorsFile, key: str, box: Box) -> np.ndarray:
    """The part `box` of tensor `key` (file layout and dtype), reading only its byte ranges."""
    dtype, shape, offset = file.location(key)
    out_shape = tuple(stop - start for start, stop in box)
    if 0 in out_shape:
        return np.zeros(out_shape, dtype)
    strides = [int(np.prod(shape[d + 1:])) * dtype.itemsize for d in range(len(shape))]  # bytes per index
    # The trailing dims the box covers whole join the run; the dim before them is partly covered.
    full = len(shape)
    while full > 0 and box[full - 1] == (0, shape[full - 1]):
        full -= 1
    if full == 0:  # the whole tensor: one run
        runs: list[tuple[int, int]] = [(offset, int(np.prod(shape)) * dtype.itemsize)]
    else:
        run_dim = full - 1
        length = (box[run_dim][1] - box[run_dim][0]) * strides[run_dim]
        runs = [
            (offset + sum(i * strides[d] for d, i in enumerate(outer)) + box[run_dim][0] * strides[run_dim], length)
            for outer in itertools.product(*(range(start, stop) for start, stop in box[:run_dim]))
        ]
    buffer = np.empty(sum(length for _, length in runs), np.uint8)
    pos = 0
    for start, length in runs:
        buffer[pos:pos + length] = file.read_bytes(start, length)  # raises CheckpointError if truncated
        pos += length
    READ_COUNTER.bytes += len(buffer)
    READ_COUNTER.reads += len(runs)
    return buffer.view(dtype).reshape(out_shape)


class TensorSlices:
    """One checkpoint tensor in trlax's layout, read on demand: `tensor[index]` reads only that box.

    `shape` is the param's (Flax) shape: the file's shape reversed when `transpose`
    (kernels [in, out] from torch's [out, in]); `tensor[index]` is cast to `dtype`. A box
    asked for again (devices holding the same slice) is read once.
    """

    def __init__(self, file: SafetensorsFile, key: str, transpose: bool, dtype: Any) -> None:
        self.file, self.key, self.transpose = file, key, transpose
        _, file_shape, _ = file.location(key)
        self.shape: tuple[int, ...] = tuple(reversed(file_shape)) if transpose else tuple(file_shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._read: dict[Box, np.ndarray] = {}

    def __getitem__(self, index: Sequence[Any]) -> np.ndarray:
        box = _box(index if isinstance(index, tuple) else (index,), self.shape)
        file_box = tuple(reversed(box)) if self.transpose else box
        if file_box not in self._read:
            self._read[file_box] = read_box(self.file, self.key, file_box)
        block = self._read[file_box]
        return np.asarray(block.T if self.transpose else block, dtype=self.dtype)


def tensor_slices(reader: CheckpointReader, key: str, transpose: bool, dtype: Any) -> TensorSlices | None:
    """A `TensorSlices` for `key`, or None when its file cannot be read in parts (a pytorch_model.bin)."""
    file = reader.opened_file(key)
    if not isinstance(file, SafetensorsFile):
        return None
    return TensorSlices(file, key, transpose, dtype)
