"""Training-state checkpoints with Orbax: params, optimizer state, step, rng, adapters.

One step is one folder `<dir>/<step>` holding the arrays (`state/`, Orbax's tensorstore
layout, every host writing its own shards) and a small JSON (`meta/`: step, rng impl,
user extras). Orbax writes each step into a temporary folder and renames it only once
complete, so a crash mid-save leaves the previous steps restorable; the manager keeps the
last `max_to_keep` steps.

One writer per folder: a writing checkpointer holds `<dir>/.trlax-writer.lock` (an
advisory `flock`, see `trlax.checkpoint.lock`; in a multi-host job process 0 holds it for
the job), and a second writer gets a CheckpointError naming the owner. Only the lock
holder cleans up temporary folders of crashed saves, so no process ever deletes another
live process's step in progress; a dead owner's lock is taken over at once. Readers
(`read_only=True`, `restore_state`) take no lock, and list a step only when Orbax has
committed all of its items (`_CHECKPOINT_METADATA` and each item's `commit_success.txt`).

Saves may be asynchronous: `save_state(..., async_save=True)`
returns once the arrays are copied off the devices, and the write finishes in the
background (the next save, `wait_until_finished`, or interpreter exit waits for it).

Restoring takes target shardings, so a state saved on one mesh restores onto another
(8 devices -> 4, FSDP -> tensor parallel): pass a Mesh and the params' sharding rules
place every leaf, optimizer moments included (their paths end like the params').
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from trlax.checkpoint.gather import global_replicas, on_writer_process
from trlax.checkpoint.lock import WriterLock
from trlax.errors import CheckpointError, TrlaxError, TrlaxTypeError
from trlax.inputs import check_not_deleted, dtype_kind
from trlax.sharding import ParamRule, ShardingRules, auto_mesh, check_mesh, resolve_rules, tree_shardings

STATE_ITEMS = ("params", "opt_state", "rng", "adapters")
logger = logging.getLogger("trlax")

SAVED_ITEMS = ("state", "meta")  # the Orbax items of one step folder
# Orbax's markers of a finished step: one in the step folder, one in each item folder.
STEP_COMMITTED, ITEM_COMMITTED = "_CHECKPOINT_METADATA", "commit_success.txt"


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the float leaves of `tree` holding NaN or inf in the part this process holds.

    Each local shard is reduced on its own device, every device's shards in one compiled call, so no
    collective runs (processes of a multi-host job never wait on one another here), one program is compiled
    per device and tree, and one bool per shard comes to the host.
    """
    paths, on_device, on_host = [], collections.defaultdict(list), []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(getattr(leaf, "dtype", np.int32), jnp.inexact):
            continue
        paths.append(jax.tree_util.keystr(path))
        if isinstance(leaf, jax.Array):  # one copy of each local shard
            for shard in {str(shard.index): shard for shard in leaf.addressable_shards}.values():
                on_device[shard.device].append((len(paths) - 1, shard.data))
        else:
            on_host.append((len(paths) - 1, bool(np.isfinite(leaf).all())))
    verdicts = list(on_host)
    for parts in on_device.values():
        finite = np.asarray(shards_finite([data for _, data in parts]))
        verdicts += [(index, bool(ok)) for (index, _), ok in zip(parts, finite, strict=True)]
    bad = {index for index, ok in verdicts if not ok}
    return [path for index, path in enumerate(paths) if index in bad]


@jax.jit
def shards_finite(parts: list[jax.Array]) -> jax.Array:
    """[len(parts)] bool: whether each array (all on one device) holds only finite values."""
    return jnp.stack([jnp.isfinite(part).all() for part in parts])


def leaf_name(path: tuple[Any, ...]) -> str:
    """A leaf's name in Orbax's files: its keys joined by dots (`opt_state.0.mu.w`)."""
    return ".".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path)


def check_savable(state: dict[str, Any]) -> None:
    """Refuse, before anything is written, what Orbax would save into a step that cannot be restored or would
    fail midway: params without arrays (the empty step still counts toward `max_to_keep`, deleting a real one),
    leaves that are not arrays of numbers, bools or keys, nor numbers (a string: a raw Orbax error and a
    temporary folder left behind), arrays a donating step deleted, and two leaves with one name in Orbax's
    files (`{"a.b": x, "a": {"b": y}}` restored both as y)."""
    if not jax.tree_util.tree_leaves(state.get("params")):
        raise TrlaxError("params hold no arrays: there is nothing to save (an empty step would still count toward "
                         "max_to_keep and delete a saved one); pass the model's params")
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None) if not isinstance(leaf, (bool, int, float)) else np.dtype(type(leaf))
        if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
                                 or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
            raise TrlaxTypeError(f"{leaf_name(path)} is a {type(leaf).__name__}"
                                 f"{f' of {dtype}' if dtype is not None else ''}: a training state holds arrays "
                                 "(numbers, bools, jax.random keys) and numbers only (JSON values go in extra=)")
    check_not_deleted([leaf for _, leaf in leaves], "the state to save")
    names = collections.Counter(leaf_name(path) for path, _ in leaves)
    if clashes := sorted(name for name, count in names.items() if count > 1):
        raise TrlaxError(f"two leaves of the state are both named {clashes[0]} in Orbax's files (keys are joined "
                         "by dots): rename a key that holds a dot")


def stored_as(leaf: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype kind) of a leaf as Orbax stores it: a typed jax.random key as its raw key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(leaf.shape), dtype_kind(leaf.dtype)


def step_is_complete(step_dir: Path) -> bool:
    """Whether a committed step folder holds every item with Orbax's commit markers."""
    return (step_dir / STEP_COMMITTED).is_file() and all(
        (step_dir / item / ITEM_COMMITTED).is_file() for item in SAVED_ITEMS)


def remove_crashed_steps(directory: Path) -> list[Path]:
    """For the writer (holding the folder's lock): delete what crashed saves left: Orbax's temporary folders
    (`<step>.orbax-checkpoint-tmp-<time>`; done here, before any save, rather than in Orbax's background
    clean-up, whose thread a quick exit leaves running into interpreter shutdown) and step folders left
    incomplete, which Orbax would count as the latest step and toward `max_to_keep` (deleting complete steps
    instead); raise CheckpointError for a folder named like a step that holds no Orbax step at all. Returns
    the removed folders."""
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and ocp.utils.is_tmp_checkpoint(entry):
            logger.info("%s: removed %s, the temporary folder of a save that did not finish", directory, entry.name)
            shutil.rmtree(entry)
            removed.append(entry)
            continue
        if not (entry.is_dir() and entry.name.isdigit()) or step_is_complete(entry):
            continue
        if not any((entry / name).exists() for name in (STEP_COMMITTED, *SAVED_ITEMS)):
            raise CheckpointError(f"{entry} is named like a saved step but holds no training state; move it out of "
                                  f"{directory} (Orbax would count it as a step, and delete saved steps for it)")
        logger.warning("%s: removed step %s, which a crashed save left incomplete", directory, entry.name)
        shutil.rmtree(entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def interrupts_held(what: str) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has finished, then raise KeyboardInterrupt; a second Ctrl-C raises at
    once. An Orbax save interrupted midway leaves its worker threads writing into interpreter shutdown (hundreds
    of lines of tracebacks after "interrupted"). Only where SIGINT has Python's default handler, in the main
    thread; elsewhere the block runs as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        logger.warning("interrupted: finishing %s first (press Ctrl-C again to stop at once)", what)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:  # not if the block installed a handler of its own
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:  # (an error from the block wins: it propagates instead)
        raise KeyboardInterrupt


class RestoredState(NamedTuple):
    """What `restore_state` returns; absent items are None."""

    step: int
    params: Any
    opt_state: Any
    rng: jax.Array | None
    adapters: Any
    extra: dict[str, Any]


class StateCheckpointer:
    """An Orbax CheckpointManager for trlax training states in one directory.

    max_to_keep: how many of the latest steps to keep (None: all). async_save: return
    from `save` before the files are written (call `wait_until_finished` before reading
    them from another process). read_only: for readers beside a training process: never
    writes, deletes, or cleans up another process's unfinished save. A writer takes the
    folder's single-writer lock (see the module docstring) and raises CheckpointError when
    another live process holds it.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = False,
                 read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise TrlaxError(f"max_to_keep must be >= 1 or None (keep all); got {max_to_keep}")
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is a file, not a folder of training states; pass a folder")
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self._lock: WriterLock | None = None
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            def take_lock() -> list[Path]:  # the job's lock; the other hosts write their shards under it
                self.directory.mkdir(parents=True, exist_ok=True)
                self._lock = WriterLock(self.directory)
                return []

            on_writer_process(take_lock, f"{self.directory} (taking its writer lock)")  # every process raises
            # Holding the lock, every temporary folder here is from a save that crashed: `remove_crashed_steps`.
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                   create=True)
        try:
            if not read_only:
                on_writer_process(lambda: remove_crashed_steps(self.directory), f"{self.directory} (its step folders)")
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        except BaseException:
            self._release_lock()
            raise

    # --- saving -------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any = None, *, rng: jax.Array | None = None,
             adapters: Any = None, extra: dict[str, Any] | None = None) -> None:
        """Save one step: params (the policy + value head pytree), optax state, rng key, adapters.

        `extra` is any JSON-serialisable dict (e.g. a config or metrics). A step that is
        already saved, or earlier than the latest saved one, raises CheckpointError.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TrlaxError(f"step must be an int >= 0; got {step!r}")
        if extra is not None and not isinstance(extra, dict):  # restoring reads it as a dict
            raise TrlaxTypeError(f"extra must be a dict of JSON values (or None); got {type(extra).__name__}")
        if rng is not None and not isinstance(rng, (jax.Array, np.ndarray)):
            raise TrlaxTypeError(f"rng must be a jax.random key (jax.random.key(seed)); got {type(rng).__name__}")
        try:  # before anything is written: Orbax would fail only after saving the arrays
            json.dumps(extra or {}, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TrlaxTypeError(f"extra must hold JSON values (numbers, strings, lists, dicts): {e}; convert arrays "
                                 "with float(x) or x.tolist()") from None
        if step in self.manager.all_steps():
            raise CheckpointError(f"step {step} is already saved in {self.directory}; use a new step number")
        latest = self.manager.latest_step()
        if latest is not None and step < latest:  # Orbax would skip it without a word
            raise CheckpointError(f"step {step} is not after the latest saved step {latest} in {self.directory}; "
                                  "save a later step, or into another folder")
        rng_impl = None
        if rng is not None and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng_impl = str(jax.random.key_impl(rng))
            rng = jax.random.key_data(rng)
        items = {"params": params, "opt_state": opt_state, "rng": rng, "adapters": adapters}
        check_savable({k: v for k, v in items.items() if v is not None})
        state = global_replicas({k: v for k, v in items.items() if v is not None})  # multi-host: rng too
        if non_finite := non_finite_leaves(state):
            logger.warning("step %d: %d saved array(s) hold NaN or inf values, e.g. %s; saved as they are", step,
                           len(non_finite), non_finite[:3])
        meta = {"step": step, "items": sorted(state), "rng_impl": rng_impl, "extra": extra or {}}
        with interrupts_held(f"saving step {step} in {self.directory}"):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)))

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been written and committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the folder's writer lock."""
        try:
            with interrupts_held(f"the pending saves in {self.directory}"):
                self.manager.wait_until_finished()
                self.manager.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StateCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- restoring ----------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The saved steps whose every item is committed, ascending."""
        return sorted(step for step in self.manager.all_steps() if step_is_complete(self._step_dir(step)))

    def latest_step(self) -> int | None:
        """The highest step saved in the folder, or None when it holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> Path:
        return Path(self.manager.directory) / str(step)

    def restore(
        self,
        step: int | None = None,
        *,
        target: dict[str, Any] | None = None,
        target_sharding: Mesh | Sharding | Any = None,
        sharding_rules: ShardingRules | list[ParamRule] | None = None,
        model_type: str | None = None,
    ) -> RestoredState:
        """Restore a step (default: the latest) with the layout you ask for.

        target: {"params": ..., "opt_state": ...} (any subset) of arrays or
            ShapeDtypeStructs: gives those items their pytree types (optax's NamedTuples)
            and, when its leaves carry shardings and `target_sharding` is None, their layout.
            Items not in `target` come back as nested dicts/lists.
        target_sharding: a Mesh (each leaf sharded by the param rules, see
            `trlax.sharding`; `sharding_rules` / `model_type` pick them), one Sharding for
            every leaf, or a pytree of Shardings shaped like the state dict
            {"params": ..., "opt_state": ..., "rng": ..., "adapters": ...}. Default:
            the target's shardings (a leaf off the target's mesh, like optax's uncommitted
            step count, and items the target lacks: replicated over that mesh), else the
            first local device.
        """
        if target is not None and not isinstance(target, dict):
            raise TrlaxTypeError(f"target must be a dict of items {list(STATE_ITEMS)} (e.g. {{'params': params}}); "
                                 f"got {type(target).__name__}")
        if not (target_sharding is None or isinstance(target_sharding, (Mesh, Sharding)) or all(
                isinstance(leaf, Sharding) for leaf in jax.tree_util.tree_leaves(target_sharding))):
            raise TrlaxTypeError("target_sharding must be a Mesh, a Sharding, or a pytree of Shardings shaped like "
                                 f"the state; got {type(target_sharding).__name__}")
        step = self.saved_step(step)
        meta = self._meta(step)

        def read() -> dict[str, Any]:
            abstract = self._abstract_state(step, target or {})
            shardings = self._shardings(abstract, target_sharding, sharding_rules, model_type)
            abstract = jax.tree_util.tree_map(lambda leaf, sharding: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings)
            return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))

        state = self._read(step, read)["state"]
        rng = state.get("rng")
        if rng is not None and meta.get("rng_impl"):
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
        return RestoredState(int(meta["step"]), state.get("params"), state.get("opt_state"), rng,
                             state.get("adapters"), dict(meta.get("extra") or {}))

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The `extra` dict saved with a step (default: the latest), read without its arrays."""
        return dict(self._meta(self.saved_step(step)).get("extra") or {})

    def saved_step(self, step: int | None) -> int:
        """`step`, or the latest when None; CheckpointError when it is not a complete saved step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no saved training state in {self.directory}")
        if step not in self.all_steps():
            damaged = " (its folder is incomplete)" if step in self.manager.all_steps() else ""
            raise CheckpointError(f"step {step} is not saved in {self.directory}{damaged}; "
                                  f"saved steps: {self.all_steps()}")
        return step

    def _meta(self, step: int) -> dict[str, Any]:
        return self._read(step, lambda: self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())))["meta"]

    def _read(self, step: int, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`read()` of a step, Orbax's and TensorStore's bare errors for damaged files turned into a CheckpointError."""
        try:
            return read()
        except TrlaxError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise bare errors for damaged files
            reason = " ".join(str(e).split())[:400]
            raise CheckpointError(f"step {step} in {self.directory} cannot be restored: its files are damaged or do "
                                  f"not fit the target ({type(e).__name__}: {reason}); restore another step "
                                  f"(saved: {self.all_steps()}), or remove {self._step_dir(step)} to resume from "
                                  "the step before it") from None

    def _abstract_state(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """ShapeDtypeStructs of the saved state; `target`'s items replace the saved structure."""
        unknown = set(target) - set(STATE_ITEMS)
        if unknown:
            raise TrlaxError(f"target has unknown item(s) {sorted(unknown)}; items: {list(STATE_ITEMS)}")
        saved = self.manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        missing = set(target) - set(saved)
        if missing:
            raise CheckpointError(f"step {step} in {self.directory} has no {sorted(missing)}; "
                                  f"it holds {sorted(saved)}")
        for name in target:  # leaves in any order (optax's NamedTuples flatten in field order, the files by name)
            held, given = (sorted(map(stored_as, jax.tree_util.tree_leaves(tree))) for tree in (saved[name],
                                                                                             target[name]))
            if held != given:
                only_target, only_saved = sorted(set(given) - set(held))[:2], sorted(set(held) - set(given))[:2]
                raise CheckpointError(
                    f"target[{name!r}] does not fit step {step} in {self.directory}: {len(given)} leaves against the "
                    f"step's {len(held)}, (shape, dtype kind) only in the target: {only_target}, only in the step: "
                    f"{only_saved}; pass a target built as the state was (the same model and optimizer), or none")

        def spec(leaf: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)
                                        if isinstance(getattr(leaf, "sharding", None), Sharding) else None)

        return {name: jax.tree_util.tree_map(spec, target[name] if name in target else saved[name])
                for name in saved}

    @staticmethod
    def _shardings(abstract: dict[str, Any], target_sharding: Any, rules: Any, model_type: str | None) -> Any:
        if isinstance(target_sharding, Mesh):  # a mesh the rules leave unused is refused, as by shard_model
            rules = resolve_rules(model_type, rules)
            check_mesh(auto_mesh(target_sharding), rules)
            return tree_shardings(abstract, target_sharding, rules)
        if isinstance(target_sharding, Sharding):
            return jax.tree_util.tree_map(lambda _: target_sharding, abstract)
        if target_sharding is not None:
            return target_sharding
        meshes = [leaf.sharding.mesh for leaf in jax.tree_util.tree_leaves(abstract)
                  if isinstance(leaf.sharding, NamedSharding)]
        if not meshes:
            default = SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree_util.tree_map(lambda leaf: leaf.sharding or default, abstract)
        # A target on a mesh: a leaf off it (Adam's step count, left uncommitted on device 0 by optax's init; an
        # item the target lacks) comes back replicated over the mesh, where one jitted step can use it.
        mesh_devices, replicated = set(meshes[0].devices.flat), NamedSharding(meshes[0], PartitionSpec())
        return jax.tree_util.tree_map(lambda leaf: leaf.sharding if leaf.sharding is not None and set(
            leaf.sharding.device_set) == mesh_devices else replicated, abstract)


# One checkpointer per directory for the function API, so consecutive `save_state` calls
# share a manager (an async save finishes before the next starts) and pending saves are
# committed at exit.
_CHECKPOINTERS: dict[Path, StateCheckpointer] = {}


def _checkpointer(directory: str | os.PathLike, max_to_keep: int | None, async_save: bool) -> StateCheckpointer:
    path = Path(directory).absolute()
    current = _CHECKPOINTERS.get(path)
    if current is not None and (current.max_to_keep, current.async_save) == (max_to_keep, async_save):
        return current
    if current is not None:
        current.close()
    _CHECKPOINTERS[path] = StateCheckpointer(path, max_to_keep=max_to_keep, async_save=async_save)
    return _CHECKPOINTERS[path]


def save_state(
    directory: str | os.PathLike,
    step: int,
    params: Any,
    opt_state: Any = None,
    *,
    rng: jax.Array | None = None,
    adapters: Any = None,
    extra: dict[str, Any] | None = None,
    max_to_keep: int | None = 3,
    async_save: bool = False,
) -> StateCheckpointer:
    """Save a training state as step `step` of `directory`, keeping the last `max_to_keep` steps.

    params: the policy's pytree (with its value head); opt_state: the optax state; rng: a
    jax.random key (typed or raw); adapters: LoRA / reward-adapter collections; extra: a
    JSON-serialisable dict. Sharded arrays are written shard by shard, by every host.
    With `async_save=True` it returns once the arrays are off the devices; call
    `.wait_until_finished()` on the returned checkpointer (or `wait_until_finished(dir)`)
    before another process reads the step.
    """
    checkpointer = _checkpointer(directory, max_to_keep, async_save)
    checkpointer.save(step, params, opt_state, rng=rng, adapters=adapters, extra=extra)
    return checkpointer


def restore_state(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    target: dict[str, Any] | None = None,
    target_sharding: Mesh | Sharding | Any = None,
    sharding_rules: ShardingRules | list[ParamRule] | None = None,
    model_type: str | None = None,
) -> RestoredState:
    """Restore a training state saved by `save_state` (default: the latest step).

    See `StateCheckpointer.restore` for `target` and `target_sharding`: pass a Mesh to
    restore every leaf straight into its sharded layout on that mesh, whatever mesh it
    was saved from.
    """
    path = Path(directory).absolute()
    if path in _CHECKPOINTERS:
        _CHECKPOINTERS[path].wait_until_finished()
    elif not path.is_dir():
        raise CheckpointError(f"{directory} is not a directory of saved training states")
    checkpointer = _CHECKPOINTERS.get(path) or StateCheckpointer(path, max_to_keep=None, read_only=True)
    try:
        return checkpointer.restore(step, target=target, target_sharding=target_sharding,
                                    sharding_rules=sharding_rules, model_type=model_type)
    finally:
        if path not in _CHECKPOINTERS:
            checkpointer.manager.close()


def wait_until_finished(directory: str | os.PathLike | None = None) -> None:
    """Wait for pending asynchronous `save_state` writes (of one directory, or all)."""
    paths = list(_CHECKPOINTERS) if directory is None else [Path(directory).absolute()]
    for path in paths:
        if path in _CHECKPOINTERS:
            _CHECKPOINTERS[path].wait_until_finished()


def _close_all() -> None:
    for checkpointer in _CHECKPOINTERS.values():
        checkpointer.close()
    _CHECKPOINTERS.clear()


# Pending asynchronous saves must be committed before Python shuts down its thread pools
# (Orbax writes through them), and that happens before `atexit` callbacks run. threading's
# exit hooks run first, in reverse order of registration, so this one precedes the pools'.
getattr(threading, "_register_atexit", atexit.register)(_close_all)
