"""Local stand-ins for the Hugging Face hub, so the hub code path runs in tests without a network: a
cache laid out as huggingface_hub lays it out (offline), and the hub's file endpoint (online:
huggingface_hub's `hf_hub_download` against a local server).

The endpoint serves `/<owner>/<name>/resolve/<revision>/<file>` from local folders, each repo at one commit (its
branch `main` and the commit hash resolve; any other revision is the hub's RevisionNotFound), answers an
unknown repo with RepoNotFound and a token outside `tokens` (when set) with 401, as the hub does.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from huggingface_hub.file_download import repo_folder_name

RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)")


def lay_out_hub_cache(cache: Path, repo_id: str, files: Path, commit: str = "a" * 40) -> None:
    """A hub cache folder as huggingface_hub lays it out (blobs, snapshots, refs)."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(files.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))


@dataclass
class StandInHub:
    repos: dict[str, tuple[Path, str]] = field(default_factory=dict)  # repo id -> (folder, commit)
    tokens: set[str] | None = None  # None: every request is served
    requests: list[str] = field(default_factory=list)  # "<repo>@<revision>/<file>", in order

    def add(self, repo_id: str, folder: Path, commit: str) -> None:
        self.repos[repo_id] = (Path(folder), commit)


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def error(self, status: int, code: str | None, message: str, body: bool) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            self.reply(status, b'{"error": "%s"}' % message.encode(), headers, body)

        def answer(self, body: bool) -> None:
            match = RESOLVE.match(self.path)
            if match is None:
                return self.error(404, "RepoNotFound", "Repository not found", body)
            repo, revision, name = match.groups()
            hub.requests.append(f"{repo}@{revision}/{name}")
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if hub.tokens is not None and token not in hub.tokens:
                return self.error(401, None, "Invalid credentials in Authorization header", body)
            if repo not in hub.repos:
                return self.error(404, "RepoNotFound", "Repository not found", body)
            folder, commit = hub.repos[repo]
            if revision not in ("main", commit):
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            path = folder / name
            if not path.is_file():
                return self.error(404, "EntryNotFound", "Entry not found", body)
            data = path.read_bytes()
            self.reply(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                   "Content-Type": "application/octet-stream"}, body)

    return Handler


@contextmanager
def stand_in_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[StandInHub]:
    """Point huggingface_hub (online, with an empty cache at `cache`) at a stand-in hub for the block."""
    hub = StandInHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
