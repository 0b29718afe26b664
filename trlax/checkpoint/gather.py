"""Save an HF checkpoint from params that span several processes (a multi-host mesh).

On a pod no host can read an array whose shards live on other hosts' devices
(`np.asarray` fails). A save therefore runs on every process at once:

- `checkpoint_tensors` turns the param tree into the checkpoint's tensors; each one that
  spans other hosts becomes a `GatheredTensor`, whose shape and dtype are known up front
  and whose data is gathered only when the writer reads it (`np.asarray`).
- `write_checkpoint` lets process 0 write the files with the ordinary writer while every
  other process takes part in the same gathers in the same order and writes nothing.
  Tensors are gathered one at a time, so no host holds more than one full tensor beyond
  its own shards. Fully replicated tensors are read from a local device, without a
  collective. If process 0 fails mid-write, it still joins the remaining gathers, so no
  peer waits forever, and every process raises.

Host-only operations (`state_dict`, the value head's export) call `host_array`, which
turns JAX's RuntimeError for such arrays into a `MultiHostError` naming the call to use.
Small trees (a LoRA adapter) are gathered whole with `host_tree` and written by process 0
(`on_writer_process`); `global_replicas` makes host-local leaves (an rng key) savable by Orbax.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trlax.checkpoint.dtypes import is_float, key_dtype
from trlax.checkpoint.naming import TensorRule, get_path
from trlax.checkpoint.writer import write_checkpoint_dir
from trlax.errors import CheckpointError, MultiHostError, UnsupportedModelError

WRITER_PROCESS = 0  # the process that writes the files of a multi-host save


def spans_other_hosts(leaf: Any) -> bool:
    """Whether `leaf` is a jax.Array with shards on devices of other processes."""
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def host_array(leaf: Any, *, instead: str) -> np.ndarray:
    """`np.asarray(leaf)`, or a MultiHostError naming `instead` when `leaf` spans other hosts' devices."""
    if spans_other_hosts(leaf):
        raise MultiHostError(
            f"an array of shape {tuple(leaf.shape)} sharded as {getattr(leaf.sharding, 'spec', leaf.sharding)} "
            f"spans devices of other processes (this is process {jax.process_index()} of {jax.process_count()}), "
            f"so this host cannot read it whole; use {instead}"
        )
    return np.asarray(leaf)


class GatherPlan:
    """The gathers of one save, in the one order every process performs them."""

    def __init__(self) -> None:
        self.tensors: list[GatheredTensor] = []
        self.done = 0  # how many have been gathered

    def add(self, key: str, array: jax.Array, transpose: bool, dtype: Any = None) -> GatheredTensor:
        tensor = GatheredTensor(self, len(self.tensors), key, array, transpose, dtype)
        self.tensors.append(tensor)
        return tensor

    def gather(self, position: int) -> np.ndarray:
        """The full tensor at `position`; a collective: every process gathers the same tensor."""
        if position != self.done:
            expected = self.tensors[self.done].key if self.done < len(self.tensors) else "none (all gathered)"
            raise CheckpointError(
                f"multi-host save asked for {self.tensors[position].key!r} out of order (next: {expected}); "
                "the writer must read each gathered tensor once, in key order"
            )
        self.done += 1
        return self.tensors[position].fetch()

    def drain(self) -> None:
        """Take part in every gather not yet done (the other processes' side of a save)."""
        while self.done < len(self.tensors):
            self.gather(self.done)


class GatheredTensor:
    """A checkpoint tensor whose array spans other hosts: shape and dtype now, data on `np.asarray`.

    `shape` is the saved (HF) shape: the array's reversed when `transpose` (torch Linear
    weights [out, in] from kernels [in, out]); `dtype` the saved dtype (a float array is
    cast to `dtype` when given).
    """

    def __init__(self, plan: GatherPlan, position: int, key: str, array: jax.Array, transpose: bool,
                 dtype: Any = None) -> None:
        self.plan, self.position, self.key = plan, position, key
        self.array, self.transpose = array, transpose
        self.shape: tuple[int, ...] = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
        cast = dtype is not None and is_float(array.dtype)
        self.dtype = np.dtype(dtype) if cast else np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def fetch(self) -> np.ndarray:
        """The whole tensor on this host, in the saved layout (collective unless fully replicated)."""
        if self.array.is_fully_replicated:  # every device holds all of it: read a local copy
            full = np.asarray(self.array.addressable_data(0))
        else:
            full = gather_to_hosts(self.array)
        full = full.astype(self.dtype, copy=False)
        return np.ascontiguousarray(full.T) if self.transpose else full

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self.plan.gather(self.position)
        return full if dtype is None else full.astype(dtype)


def _host_layout(shape: tuple[int, ...]) -> NamedSharding:
    """Each process's devices together hold one whole copy: split over a process's local
    devices (along the first dim they divide), replicated across processes."""
    devices = np.array([jax.local_devices(process_index=p) for p in range(jax.process_count())])
    mesh = Mesh(devices, ("processes", "local"))
    local = devices.shape[1]
    dim = next((d for d, n in enumerate(shape) if n % local == 0), None)
    spec = PartitionSpec() if dim is None else PartitionSpec(*(None,) * dim, "local")
    return NamedSharding(mesh, spec)


@functools.lru_cache(maxsize=256)
def _mover(sharding: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """One jitted copy per target layout: compiled once per tensor shape."""
    return jax.jit(lambda x: x, out_shardings=sharding)


def gather_to_hosts(array: jax.Array) -> np.ndarray:
    """The whole of a sharded `array` as numpy on every host.

    A collective: every process calls it with the same array. Unlike replicating onto every
    device (`multihost_utils.process_allgather`), the copy each process receives is spread
    over its own devices, so a host holds the tensor once on its devices and once in numpy.
    """
    # (A transpose stays on the host: transposing on device made XLA replicate before splitting.)
    shape = tuple(array.shape)
    moved = _mover(_host_layout(shape))(array)
    full = np.empty(shape, np.dtype(array.dtype))
    for shard in moved.addressable_shards:
        full[shard.index] = np.asarray(shard.data)
    return full


def host_tree(tree: Any) -> Any:
    """`tree` with every array as numpy on this host; leaves spanning other hosts are gathered
    (a collective: every process calls it). For small trees (LoRA adapters, a value head)."""
    def one(leaf: Any) -> Any:
        if not spans_other_hosts(leaf):
            return np.asarray(leaf)
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return gather_to_hosts(leaf)

    return jax.tree_util.tree_map(one, tree)


def on_writer_process(write: Callable[[], list[Path]], what: str) -> list[Path]:
    """Run `write` on process 0 only (after a `host_tree`, say); every process raises if it failed.
    Returns what `write` returned on process 0, [] elsewhere."""
    written: list[Path] = []
    error: Exception | None = None
    if jax.process_index() == WRITER_PROCESS:
        try:
            written = write()
        except Exception as e:  # reported to the peers below before it is raised
            error = e
    _raise_if_failed(error, what)
    return written


def _raise_if_failed(error: Exception | None, what: str) -> None:
    """Tell every process whether the writer failed (a collective); raise on all of them if so."""
    failed = 0 if jax.process_count() == 1 else multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if int(failed):
        raise CheckpointError(f"process {WRITER_PROCESS} failed to write {what}; see its error")


def global_replicas(tree: Any) -> Any:
    """With several processes: `tree` with each host-local leaf (numpy, or a jax.Array on this
    host's devices, like an rng key) replaced by a global array replicated on every device,
    so Orbax can save it. Every process must hold the same values (JAX checks). Global
    leaves are kept; with one process the tree is returned as it is."""
    if jax.process_count() == 1:
        return tree
    everywhere = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())

    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return leaf
        return jax.device_put(np.asarray(leaf), everywhere)

    return jax.tree_util.tree_map(one, tree)


def checkpoint_tensors(params: Mapping[str, Any], table: Mapping[str, TensorRule], dtype: Any = None,
                       float32_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """HF key -> tensor for every entry of `table` (a model's key table), in table order,
    floats cast to `dtype` when given; with `dtype` float16, keys matching a `float32_keys`
    regex are float32 (what a float16 transformers model holds and saves there).

    Arrays on this host's devices come back as numpy arrays in the HF layout (a stacked
    param fetched once for all its keys); arrays that span other hosts as `GatheredTensor`s
    (gathered when written; see `write_checkpoint`).
    """
    plan = GatherPlan()
    tensors: dict[str, Any] = {}
    host: tuple[tuple[str, ...], np.ndarray] | None = None
    for key, rule in table.items():
        leaf = get_path(params, rule.path)
        want = key_dtype(key, dtype, float32_keys)
        if spans_other_hosts(leaf):
            if rule.index:
                raise UnsupportedModelError(f"saving the stacked expert param {key!r} from a multi-host mesh is not "
                                            "supported yet; save it from one process (trlax convert) instead")
            tensors[key] = plan.add(key, leaf, rule.transpose, want)
            continue
        if host is None or host[0] != rule.path:
            host = (rule.path, np.asarray(leaf))
        tensor = rule.to_hf(host[1])
        tensors[key] = tensor.astype(want, copy=False) if want is not None and is_float(tensor.dtype) else tensor
    return tensors


def write_checkpoint(
    save_directory: str | os.PathLike,
    tensors: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """`write_checkpoint_dir`, also from a multi-host mesh (call it on every process then).

    With `GatheredTensor`s among `tensors`, process 0 writes (its folder must be where the
    checkpoint should end up; a shared file system if the other hosts are to read it) and
    the other processes only join the gathers; they return []. Every process raises if
    the write failed.
    """
    plans = list(dict.fromkeys(t.plan for t in tensors.values() if isinstance(t, GatheredTensor)))
    if not plans:
        return write_checkpoint_dir(save_directory, tensors, write_extra=write_extra, max_shard_size=max_shard_size)
    written: list[Path] = []
    error: Exception | None = None
    if jax.process_index() == WRITER_PROCESS:
        try:
            written = write_checkpoint_dir(save_directory, tensors, write_extra=write_extra,
                                           max_shard_size=max_shard_size)
        except Exception as e:  # joined below, so the peers' gathers still complete
            error = e
    for plan in plans:
        plan.drain()
    _raise_if_failed(error, str(save_directory))
    return written
