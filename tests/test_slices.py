"""Slice reads: a box of a safetensors tensor read from only its byte ranges equals numpy slicing."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.slices import READ_COUNTER, read_box, tensor_slices
from trlax.checkpoint.writer import write_safetensors

ARRAYS = {
    "matrix": np.arange(6 * 8, dtype=np.float32).reshape(6, 8),
    "cube": np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5),
    "vector": np.arange(10, dtype=np.float32),
    "half": (np.arange(4 * 6, dtype=np.float32).reshape(4, 6) / 7).astype(ml_dtypes.bfloat16),
    "scalar": np.array(3.5, np.float32),
}


@pytest.fixture
def reader(tmp_path: Path) -> CheckpointReader:
    write_safetensors(tmp_path / "model.safetensors", ARRAYS, {"format": "pt"})
    with CheckpointReader([tmp_path / "model.safetensors"]) as r:
        yield r


@pytest.mark.parametrize(("key", "index"), [
    ("matrix", (slice(2, 4), slice(None))),      # whole rows: one run
    ("matrix", (slice(None), slice(4, 8))),      # a column block: one run per row
    ("matrix", (slice(1, 5), slice(2, 3))),
    ("matrix", (slice(None), slice(None))),
    ("cube", (slice(1, 3), slice(0, 2), slice(1, 4))),
    ("cube", (slice(None), slice(1, 2), slice(None))),
    ("vector", (slice(5, 10),)),
    ("half", (slice(0, 2), slice(3, 6))),
    ("scalar", ()),
])
def test_read_box_equals_numpy_slicing_and_reads_only_the_box(reader: CheckpointReader, key: str,
                                                               index: tuple) -> None:
    want = ARRAYS[key][index]
    box = tuple(s.indices(n)[:2] for s, n in zip(index, ARRAYS[key].shape, strict=True))
    READ_COUNTER.reset()
    got = read_box(reader.opened_file(key), key, box)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert READ_COUNTER.bytes == want.nbytes


def test_tensor_slices_transpose_cast_and_read_each_box_once(reader: CheckpointReader) -> None:
    tensor = tensor_slices(reader, "half", transpose=True, dtype=np.float32)  # a kernel [in, out] from [out, in]
    want = ARRAYS["half"].T.astype(np.float32)
    assert tensor.shape == want.shape == (6, 4) and tensor.nbytes == want.nbytes
    READ_COUNTER.reset()
    for index in [(slice(0, 3), slice(None)), (slice(3, 6), slice(None)), (slice(0, 3), slice(None))]:
        got = tensor[index]
        assert got.dtype == np.float32 and np.array_equal(got, want[index])
    assert READ_COUNTER.bytes == ARRAYS["half"].nbytes  # the repeated box came from the first read


def test_strided_slices_are_refused(reader: CheckpointReader) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        tensor_slices(reader, "matrix", transpose=False, dtype=np.float32)[::2]
