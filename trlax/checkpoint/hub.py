"""Find a checkpoint's files: a local folder, or a hub repo through huggingface_hub.

Only the files needed are fetched: config.json, then model.safetensors, or the sharded
index and its shards, or (legacy) pytorch_model.bin / its index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import huggingface_hub
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from trlax.checkpoint.reader import parse_json_object
from trlax.checkpoint.writer import is_orbax_model
from trlax.errors import CheckpointError

CONFIG_NAME = "config.json"
# In the order they are tried; each is (single file, sharded index).
WEIGHT_FORMATS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


@dataclass(frozen=True)
class HubOptions:
    """Where and how to fetch from the hub (passed through to huggingface_hub)."""

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Local paths of a checkpoint's config and weight files."""

    source: str
    folder: Path  # where config.json lies
    weight_files: tuple[Path, ...]  # empty when the checkpoint has no weights

    @property
    def config_file(self) -> Path:
        return self.folder / CONFIG_NAME


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` can only mean a hub repo: no folder of that name, and no path (absolute,
    starting with "." or "~", or an existing file)."""
    local = Path(name_or_path)
    return not (local.is_dir() or local.is_absolute() or str(name_or_path).startswith((".", "~")) or local.exists())


def fetch_file(name_or_path: str | os.PathLike, filename: str, options: HubOptions,
               config_required: bool = True) -> Path | None:
    """A file of a local folder or hub repo; None when the repo or folder lacks it.

    Raises CheckpointError when the source itself cannot be reached (no such folder or
    repo, gated repo, offline without a cached copy of config.json, unless not `config_required`).
    """
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    name = str(name_or_path)
    try:
        return Path(hf_hub_download(
            name, filename, revision=options.revision, token=options.token,
            cache_dir=options.cache_dir, local_files_only=options.local_files_only,
        ))
    except HFValidationError:
        raise CheckpointError(
            f"{name!r} is neither a local folder nor a valid hub repo id ('owner/name'); check the path"
        ) from None
    except RevisionNotFoundError as e:
        raise CheckpointError(f"hub repo {name!r} has no revision {options.revision!r} ({_hub_reason(e)}); "
                              "check revision=") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(
            f"cannot access hub repo {name!r}, and no local folder has that name ({_hub_reason(e)}); check the id "
            "or the path, and for a private or gated repo pass token= (or log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE or no network) and not in the cache. The file may also not
        # exist at all, which offline mode cannot tell apart: report both possibilities.
        if filename == CONFIG_NAME and config_required:
            raise CheckpointError(
                f"{name!r}: no local folder of that name, and {filename} is not in the hub cache "
                "(offline or unreachable hub). Pass a local folder, or download the repo first."
            ) from None
        return None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        return None
    except HfHubHTTPError as e:  # after the not-found errors, its subclasses: a bad token, a server error
        raise CheckpointError(f"cannot fetch {filename} from hub repo {name!r} ({_hub_reason(e)}); check token= "
                              "and the connection, or pass a local folder") from None


def _hub_reason(error: Exception) -> str:
    """huggingface_hub's message on one line (it names the status, the URL and often the cause)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def resolve_checkpoint(name_or_path: str | os.PathLike, options: HubOptions | None = None,
                       require_weights: bool = True, require_config: bool = True) -> ResolvedCheckpoint:
    """Locate config.json and the weight files of a local folder or hub repo. Without `require_config` (the
    caller has a config) a source without config.json is read too, as transformers reads it given `config=`."""
    options = options or HubOptions()
    if not Path(name_or_path).is_dir() and not is_hub_id(name_or_path):
        raise CheckpointError(f"{name_or_path} is not a folder; pass the folder holding config.json")
    config = fetch_file(name_or_path, CONFIG_NAME, options, config_required=require_config)
    if config is None and require_config:
        raise CheckpointError(
            f"no {CONFIG_NAME} in {name_or_path!s}: trlax needs the transformers config next to the weights "
            "(save the model with save_pretrained, or pass config=)"
        )
    for single, index in WEIGHT_FORMATS:
        path = fetch_file(name_or_path, single, options)
        if path is not None:
            return ResolvedCheckpoint(str(name_or_path), (config or path).parent, (path,))
        index_path = fetch_file(name_or_path, index, options)
        if index_path is not None:
            shards = sorted(set(_weight_map(index_path).values()))
            files = []
            for shard in shards:
                shard_path = fetch_file(name_or_path, shard, options)
                if shard_path is None:
                    raise CheckpointError(f"{index_path.name} of {name_or_path!s} lists shard {shard}, which is "
                                          f"missing{_offline_hint(name_or_path, options)}")
                files.append(shard_path)
            return ResolvedCheckpoint(str(name_or_path), (config or index_path).parent, tuple(files))
    if require_weights or config is None:
        if is_orbax_model(name_or_path):
            raise CheckpointError(
                f"{name_or_path!s} is an Orbax model folder (written by to_orbax), not a transformers checkpoint: load "
                "it with trlax.load_orbax, or write one with `trlax convert SRC DST --to hf` (for an adapter naming it "
                "as its base, convert it and set base_model_name_or_path in adapter_config.json to DST)")
        names = ", ".join(name for pair in WEIGHT_FORMATS for name in pair)
        raise CheckpointError(f"no weights in {name_or_path!s}: expected one of {names}"
                              f"{_offline_hint(name_or_path, options)}")
    return ResolvedCheckpoint(str(name_or_path), config.parent, ())


def _offline_hint(name_or_path: str | os.PathLike, options: HubOptions) -> str:
    """For a hub repo read offline: a file the hub cache lacks is reported missing, present in the repo or not."""
    if Path(name_or_path).is_dir() or not (options.local_files_only or huggingface_hub.is_offline_mode()):
        return ""
    return (" from the hub cache (offline or local_files_only=True: the repo may have it; download the repo once "
            "online)")


def _weight_map(index_path: Path) -> dict[str, str]:
    """Tensor name -> shard file of a sharded-checkpoint index, each shard checked by `check_shard_name`."""
    index = parse_json_object(index_path.read_bytes(), f"sharded-checkpoint index {index_path}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} is not a valid sharded-checkpoint index: it needs a \"weight_map\" "
                              "object of tensor names to shard file names")
    for key, shard in weight_map.items():
        check_shard_name(index_path, key, shard)
    return weight_map


def check_shard_name(index_path: Path, key: str, shard: str) -> None:
    """Refuse a shard name that could leave the checkpoint folder (or hub snapshot): an absolute
    path, a drive, or a `..` component. The check is on the name, not the resolved path, because
    a hub snapshot's files are symlinks into the cache's blob store."""
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if (not shard or posix.is_absolute() or windows.is_absolute() or windows.drive
            or ".." in posix.parts or ".." in windows.parts):
        raise CheckpointError(f"{index_path} maps tensor {key!r} to {shard!r}, which is outside the checkpoint "
                              "folder; shard files must be plain names inside it. Refusing to read it.")
