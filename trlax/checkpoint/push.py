"""Upload a saved checkpoint folder to the hub with huggingface_hub, as transformers' push_to_hub does."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

from trlax.checkpoint.gather import WRITER_PROCESS, on_writer_process

MODEL_CARD_NAME = "README.md"


def _card_with_tags(api: HfApi, repo_id: str, tags: Sequence[str], token: str | None, revision: str | None) -> str:
    """The repo's model card (or a new one) with `tags` added to its metadata, as text."""
    card = None
    if api.file_exists(repo_id, MODEL_CARD_NAME, revision=revision, token=token):
        try:
            path = api.hf_hub_download(repo_id, MODEL_CARD_NAME, revision=revision, token=token)
            card = ModelCard(Path(path).read_text(encoding="utf-8"))
        except EntryNotFoundError:
            card = None
    if card is None:
        card = ModelCard.from_template(ModelCardData(library_name="trlax"))
    existing = list(card.data.tags or [])
    card.data.tags = existing + [tag for tag in tags if tag not in existing]
    return str(card)


def push_to_hub(
    save: Callable[[Path], Any],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model with trlax",
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: Sequence[str] | None = None,
    api: HfApi | None = None,
) -> Any:
    """Create `repo_id` if needed and upload exactly what `save(folder)` writes, in one commit.

    Returns huggingface_hub's CommitInfo. `token` and `private` go to `create_repo`;
    `revision` is a branch, created from main if missing (unless `create_pr`, where it is
    the PR's base); `commit_message`, `commit_description`, `create_pr` go to
    `upload_folder`. `tags` are added to the repo's model card (README.md), which is
    created when the repo has none, as transformers does. `api`: an HfApi-like object
    (tests pass a local stand-in). With several processes (a multi-host mesh) call it on
    every process: all take part in `save` (which gathers the sharded tensors), process 0
    alone creates the repo and uploads what it wrote; the others return None.
    """
    uploader = jax.process_index() == WRITER_PROCESS
    api = api or HfApi(token=token)

    def create() -> list[Path]:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        if revision is not None and not create_pr and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return []

    on_writer_process(create, f"to the hub repo {repo_id} (creating it)")  # a failure stops every process here
    with tempfile.TemporaryDirectory(prefix="trlax-push-") as folder:
        save(Path(folder))
        if not uploader:
            return None
        if tags:
            card = _card_with_tags(api, repo_id, list(tags), token, revision)
            (Path(folder) / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 commit_message=commit_message, commit_description=commit_description,
                                 create_pr=create_pr)
