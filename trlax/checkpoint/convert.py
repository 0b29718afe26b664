"""Convert checkpoints: HF / PyTorch (with or without TRL's value head) <-> an Orbax model folder.

An Orbax model folder holds `config.json` (the transformers config), the params as one
Orbax pytree checkpoint under `params/` (`{"pretrained_model": ..., "v_head": ...}` when
it has a value head, else the LM's params), and `trlax_orbax.json` saying which. It
restores straight into a sharded layout (`load_orbax(folder, mesh=...)`): each host reads
only the shards its devices hold, with no HF-name conversion on the way. The marker file is
written last, so an interrupted conversion leaves no folder that loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from trlax.checkpoint.dtypes import held_dtype
from trlax.checkpoint.gather import WRITER_PROCESS, checkpoint_tensors, write_checkpoint
from trlax.checkpoint.hub import HubOptions, resolve_checkpoint
from trlax.checkpoint.naming import flatten_paths, key_table
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.writer import ORBAX_MODEL_MARKER, ORBAX_PARAMS_DIR, is_orbax_model
from trlax.errors import CheckpointError, CheckpointWriteError, TrlaxError
from trlax.generation_config import read_generation_config, write_generation_config
from trlax.models.auto import AutoModel, FlaxAutoModelForCausalLM, FlaxAutoModelForSeq2SeqLM
from trlax.models.base import load_config
from trlax.models.spec import ParamRule
from trlax.peft.lora import ADAPTER_CONFIG_NAME, is_adapter_folder
from trlax.sharding import ShardingRules, auto_mesh, tree_shardings
from trlax.value_head import (
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    init_value_head,
    make_value_head,
)

FORMAT = "trlax-orbax-model"


def _classes(config: Any) -> tuple[type[AutoModel], type[PreTrainedModelWrapper]]:
    """(LM auto class, value-head wrapper class) for a config."""
    if getattr(config, "is_encoder_decoder", False):
        return FlaxAutoModelForSeq2SeqLM, FlaxAutoModelForSeq2SeqLMWithValueHead
    return FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for _, leaf in flatten_paths(tree))


def to_orbax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    value_head: bool | None = None,
    param_dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    sharding_rules: ShardingRules | list[ParamRule] | None = None,
    hub_options: HubOptions | None = None,
    progress: bool = True,
) -> Path:
    """Convert a transformers checkpoint (hub id or local folder; safetensors or .bin) to an Orbax folder.

    value_head: None = keep TRL's `v_head.*` when the checkpoint has it; True = require
    it; False = drop it. param_dtype: the stored dtype. mesh: read tensors straight into
    this layout (for models larger than one device); the Orbax files do not depend on it.
    Returns the folder.
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a folder; convert into a new folder")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; convert into a new folder")
    refuse_nested(src, dst, "SRC")
    if jax.process_count() > 1:  # every host has checked before any writes into dst
        multihost_utils.sync_global_devices("trlax.to_orbax: destination checked")
    options = hub_options or HubOptions()
    if is_adapter_folder(src, options):
        raise CheckpointError(f"{src} is a PEFT adapter (it has {ADAPTER_CONFIG_NAME}), not a full model: convert its "
                              "base, or merge the adapter into the base in PEFT (merge_and_unload), save that and "
                              "convert it")
    resolved = resolve_checkpoint(src, options)
    config = load_config(resolved.folder, resolved.source)
    with CheckpointReader(list(resolved.weight_files)) as reader:
        has_head = any(key.startswith("v_head.") for key in reader.keys())  # noqa: SIM118 - not a dict
    if value_head and not has_head:
        raise CheckpointError(f"{src} has no TRL value head (v_head.summary.*); convert without value_head=True")
    keep_head = has_head if value_head is None else value_head
    lm_cls, wrapper_cls = _classes(config)
    lm = lm_cls.model_class(config, param_dtype=param_dtype, mesh=mesh, sharding_rules=sharding_rules)
    total = _nbytes(lm.abstract_params())
    place = lm.placer() or (lambda path, array: jax.device_put(array))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {src}", disable=not progress) as bar:

        def tracked(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
            if path[0] != "v_head":  # the total counts the LM's tensors
                bar.update(array.nbytes)
            return place(path, array)

        kwargs = {"param_dtype": param_dtype, "revision": options.revision, "token": options.token,
                  "cache_dir": options.cache_dir, "local_files_only": options.local_files_only, "place": tracked}
        if keep_head:
            wrapper = wrapper_cls.from_pretrained(src, strict=True, **kwargs)
            params, lm = wrapper.params, wrapper.pretrained_model
        else:
            lm = lm_cls.from_pretrained(src, **kwargs)
            params = lm.params
    _save_orbax(dst, params, config, keep_head, param_dtype, progress, lm.generation_config, lm.storage_dtype)
    return dst


def refuse_nested(src: str | os.PathLike, dst: str | os.PathLike, what: str) -> None:
    """CheckpointError when DST is a local SRC or lies inside it: the output would be written among the
    source's files. (A DST holding SRC is fine: a save keeps the other entries of its folder.)"""
    if not Path(src).exists():  # a hub id
        return
    source, target = Path(src).resolve(), Path(dst).resolve()
    if target == source:
        raise CheckpointError(f"DST {dst} is {what} itself; convert into another folder")
    if source in target.parents:
        raise CheckpointError(f"DST {dst} lies inside {what} {src}; convert into a folder outside it")


def _save_orbax(dst: Path, params: Any, config: Any, value_head: bool, param_dtype: Any, progress: bool,
                generation_config: Any, storage_dtype: Any) -> None:
    import orbax.checkpoint as ocp  # seconds to import: only when an Orbax folder is read or written

    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    absl = logging.getLogger("absl")  # Orbax's worker threads log each failure they hand on: 200 lines for one
    level = absl.level
    absl.setLevel(logging.CRITICAL)  # full disk, which reaches the caller here as one error (the rest chained)
    try:
        with tqdm(total=_nbytes(params), unit="B", unit_scale=True, desc=f"writing {dst}",
                  disable=not progress) as bar:
            checkpointer.save(dst.absolute() / ORBAX_PARAMS_DIR, params)
            checkpointer.wait_until_finished()
            bar.update(bar.total)
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise bare errors (a full disk: ValueError)
        if jax.process_count() == 1:  # dst was new or empty (checked): leave it so, and a retry can write there
            for path in [dst] if created else list(dst.iterdir()):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise CheckpointWriteError(f"cannot write the Orbax model folder {dst} ({reason}); nothing was kept "
                                   "there") from e
    finally:
        checkpointer.close()
        absl.setLevel(level)
    if jax.process_index() == WRITER_PROCESS:  # Orbax wrote every host's shards; one host writes the rest
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = jnp.dtype(param_dtype).name  # what the params are stored as
        config.save_pretrained(str(dst))
        if generation_config is not None:
            write_generation_config(generation_config, dst)
        # storage_dtype: the source checkpoint's float dtype (see `load_orbax`: bf16 comes back bf16).
        marker = {"format": FORMAT, "version": 1, "value_head": value_head, "model_type": config.model_type,
                  "param_dtype": jnp.dtype(param_dtype).name,
                  "storage_dtype": None if storage_dtype is None else np.dtype(storage_dtype).name}
        (dst / ORBAX_MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if jax.process_count() > 1:  # no host returns (and, say, reads the folder) before the marker exists
        multihost_utils.sync_global_devices("trlax.to_orbax: marker written")


def _read_marker(path: Path) -> dict[str, Any]:
    if not is_orbax_model(path):
        raise CheckpointError(f"{path} is not a trlax Orbax model folder (no {ORBAX_MODEL_MARKER}); "
                              "create one with `trlax convert SRC DST` or trlax.convert.to_orbax")
    again = "re-create the folder with `trlax convert` from the HF checkpoint it was made from"
    try:
        marker = json.loads((path / ORBAX_MODEL_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / ORBAX_MODEL_MARKER} cannot be read ({e}); {again}") from e
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{path / ORBAX_MODEL_MARKER} is not a {FORMAT} marker: {marker}")
    name = marker.get("param_dtype")
    try:
        valid = isinstance(name, str) and jnp.issubdtype(jnp.dtype(name), jnp.floating)
    except TypeError:  # not a dtype name
        valid = False
    if not valid or not isinstance(marker.get("value_head"), bool):
        raise CheckpointError(f"{path / ORBAX_MODEL_MARKER} lacks a valid param_dtype (a float dtype name) or "
                              f"value_head (true or false): {marker}; {again}")
    return marker


def load_orbax(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    sharding_rules: ShardingRules | list[ParamRule] | None = None,
    dtype: Any = jnp.float32,
    **value_head_args: Any,
) -> Any:
    """A model from an Orbax model folder, restored straight into its sharded layout on `mesh`.

    Returns a value-head wrapper when the folder has a value head (`value_head_args` are
    TRL's `summary_dropout_prob`, ...), else the LM. dtype: the compute dtype.
    """
    import orbax.checkpoint as ocp  # seconds to import: only when an Orbax folder is read or written

    path = Path(path)
    marker = _read_marker(path)
    config = load_config(path, str(path))
    lm_cls, wrapper_cls = _classes(config)
    lm = lm_cls.model_class(config, dtype=dtype, param_dtype=held_dtype(marker["param_dtype"]))
    abstract = lm.abstract_params()
    if marker["value_head"]:
        head = make_value_head(config)
        abstract = {"pretrained_model": abstract,
                    "v_head": jax.eval_shape(lambda: init_value_head(head, jax.random.key(0)))}
    if mesh is not None:
        lm.use_mesh(mesh, sharding_rules)
        shardings = tree_shardings(abstract, auto_mesh(mesh), lm.sharding_rules)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(path.absolute() / ORBAX_PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise bare errors for damaged files
        reason = " ".join(str(e).split())[:400]
        raise CheckpointError(f"the params of the Orbax model folder {path} cannot be restored: its files are "
                              f"damaged or do not fit its config ({type(e).__name__}: {reason}); re-create it with "
                              "`trlax convert`") from None
    lm.generation_config = read_generation_config(path, HubOptions())
    # What a save writes by default: the source checkpoint's dtype when it is narrower than the params (a bf16
    # checkpoint held as float32 params comes back bf16), else the params' own, which hold no more precision.
    stored = marker.get("storage_dtype")  # None in folders written before trlax recorded it
    if stored is not None and jnp.dtype(stored).itemsize < jnp.dtype(marker["param_dtype"]).itemsize:
        lm.storage_dtype = np.dtype(jnp.dtype(stored))
    if not marker["value_head"]:
        lm.params = params
        return lm
    lm.params = params["pretrained_model"]
    return wrapper_cls(lm, v_head_params=params["v_head"], **value_head_args)


def to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_size: int | str | None = None,
          mesh: Mesh | None = None, progress: bool = True) -> list[Path]:
    """Write an Orbax model folder back as HF safetensors (+ TRL's `v_head.*` when it has a head).

    The result loads in transformers (PyTorch), TRL and trlax. Returns the written files.
    mesh: restore sharded onto it (a model larger than one device, or a multi-host mesh:
    then call it on every process; process 0 writes while the tensors are gathered one at
    a time, see `trlax.checkpoint.gather`, and the others return []).
    """
    refuse_nested(src, dst, "the Orbax folder SRC")
    if is_orbax_model(dst):
        raise CheckpointError(f"DST {dst} is an Orbax model folder; convert into a new or HF folder")
    model = load_orbax(src, mesh=mesh)
    has_head = hasattr(model, "pretrained_model")
    lm = model.pretrained_model if has_head else model
    dtype = lm.save_dtype(lm.params)  # see load_orbax; config.json states it
    tensors = lm.tensors_to_save(model.params, dtype, path_prefix=("pretrained_model",) if has_head else ())
    if has_head:  # TRL's value head stays float32
        tensors.update(checkpoint_tensors(model.params, key_table(model.params["v_head"], prefix="v_head.",
                                                                  path_prefix=("v_head",))))
    if progress:
        tensors = dict(tqdm(tensors.items(), total=len(tensors), unit="tensor", desc=f"gathering {src}"))
    return write_checkpoint(dst, tensors, write_extra=lambda tmp: lm.write_config_files(tmp, dtype),
                            max_shard_size=max_shard_size)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None, **kwargs: Any) -> Any:
    """`to_orbax` or `to_hf`; `to=None` picks by the source (an Orbax model folder converts to HF)."""
    to = to or ("hf" if is_orbax_model(src) else "orbax")
    if to == "orbax":
        return to_orbax(src, dst, **kwargs)
    if to == "hf":
        return to_hf(src, dst, **kwargs)
    raise TrlaxError(f"to must be 'orbax' or 'hf'; got {to!r}")
