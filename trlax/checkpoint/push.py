"""Upload a saved checkpoint folder to the hub with huggingface_hub."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from huggingface_hub import HfApi

from trlax.checkpoint.gather import WRITER_PROCESS


def push_to_hub(
    save: Callable[[Path], Any],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model with trlax",
    create_pr: bool = False,
    api: HfApi | None = None,
) -> Any:
    """Create `repo_id` if needed and upload exactly what `save(folder)` writes.

    Returns huggingface_hub's CommitInfo. `token`, `private`, `revision` and
    `create_pr` are passed to `create_repo` / `upload_folder` as they are. With several
    processes (a multi-host mesh) call it on every process: all take part in `save`
    (which gathers the sharded tensors), process 0 alone creates the repo and uploads
    what it wrote; the others return None.
    """
    uploader = jax.process_index() == WRITER_PROCESS
    api = api or HfApi(token=token)
    if uploader:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trlax-push-") as folder:
        save(Path(folder))
        if not uploader:
            return None
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)
