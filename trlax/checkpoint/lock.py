"""Advisory locks on checkpoint folders: one writer per folder, and liveness of a save in progress.

Locks are `flock`s, which the kernel drops when their process dies, however it dies: a lock
left by a crashed process is free again at once and the next writer simply takes it over.
On network file systems Linux maps `flock` onto POSIX record locks, which NFS servers keep
across hosts. Where `fcntl` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from trlax.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

WRITER_LOCK_NAME = ".trlax-writer.lock"


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file or folder descriptor without waiting; False if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def folder_in_use(path: Path) -> bool:
    """Whether a live process holds a lock on the folder `path` (see `FolderLock`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # vanished meanwhile
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on a folder itself (its inode), held until `release`: marks a save in progress."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        if not try_lock(self.fd):
            os.close(self.fd)
            raise CheckpointError(f"{path} is in use by another save")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WriterLock:
    """The single-writer lock of a checkpoint folder: `<folder>/.trlax-writer.lock`.

    The file names its owner (pid, host, start time) for the error a second writer gets; the
    lock itself is the `flock` on it, so a dead owner's lock is taken over at once. The file
    is never deleted (deleting a lock file races with a process opening it).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / WRITER_LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_lock(self._fd):
            owner = self._owner()
            os.close(self._fd)
            who = (f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since')})"
                   if owner else "another process")
            this = " (this process)" if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname() \
                else ""
            raise CheckpointError(
                f"{folder} already has a writer: {who}{this}. Only one process may save training states into a "
                "folder at a time; close the other checkpointer (or reuse the one `save_state` returned), save into "
                "another folder, or open this one with read_only=True to restore from it.")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
