"""Upload a saved checkpoint folder to the hub with huggingface_hub."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi


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
    `create_pr` are passed to `create_repo` / `upload_folder` as they are.
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trlax-push-") as folder:
        save(Path(folder))
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)
