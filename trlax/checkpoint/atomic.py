"""Replace a folder as a whole, atomically: at every instant it holds the complete old or new content.

`replacing_folder(target)` yields a fresh temporary folder beside the target
(`.<name>.trlax-new-<token>`, same file system, so renames are atomic) for the caller to
fill. On success the commit then runs these steps:

1. carry over the old folder's entries the caller did not write and does not drop
   (a tokenizer, a README: hard links, no copies; a copy where links fail);
2. fsync every file and folder of the new tree;
3. swap: on Linux `renameat2(RENAME_EXCHANGE)` exchanges the two folders in one step;
   elsewhere (or on file systems without it) the old folder is renamed aside
   (`.<name>.trlax-old-<token>`) and the new one renamed in;
4. fsync the parent folder, then delete the old tree.

A crash before step 3 leaves the old folder untouched; after the exchange, the new one is
in place. With the rename-aside fallback there is one moment with no target at all; the
complete old folder then waits aside, and the next save puts it back. Each save in
progress holds a lock on its temporary folders (`trlax.checkpoint.lock`), so the next save
into the same target removes exactly the leftovers of saves that died (or restores an old
folder left aside), never those of a live one.

Requirements: write access to the target's parent folder (the temporary folder lives
there); the target must not be a mount point or contain the working directory, which
cannot be swapped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from trlax.checkpoint.lock import FolderLock, folder_in_use
from trlax.errors import CheckpointError

NEW_TAG, OLD_TAG = ".trlax-new-", ".trlax-old-"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
# errnos meaning "this kernel / file system cannot exchange": use the rename-aside fallback
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def exchange_folders(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, deepest first, `root` last."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(Path(folder, name))
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(Path(folder, name))
    fsync_path(root)


def link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` (a file, symlink or folder) at `dst` with hard links, copying where linking fails."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        os.mkdir(dst)
        for child in sorted(os.listdir(src)):
            link_tree(src / child, dst / child)
    else:
        try:
            os.link(src, dst)
        except OSError:  # another file system below (a mount), or links not supported
            shutil.copy2(src, dst)


def _temporaries(target: Path) -> list[Path]:
    prefix = f".{target.name}"
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith((prefix + NEW_TAG, prefix + OLD_TAG)) and p.is_dir() and not p.is_symlink())


def recover_stale(target: Path) -> None:
    """Clean up after saves into `target` that died: put back an old folder left aside when the
    target is missing, and remove every temporary folder no live save holds."""
    for path in _temporaries(target):
        if folder_in_use(path):
            continue
        if OLD_TAG in path.name and not target.exists():
            os.rename(path, target)  # the complete old checkpoint, moved aside by a fallback swap
            fsync_path(target.parent)
        else:
            shutil.rmtree(path, ignore_errors=True)


def check_target(target: Path) -> Path:
    """The absolute, symlink-resolved target; CheckpointError when it cannot be replaced atomically."""
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"save target {target} exists and is not a folder; pass a folder path")
    if target.is_dir() and os.path.ismount(target):
        raise CheckpointError(f"save target {target} is a mount point, which cannot be replaced atomically; "
                              "save into a folder inside it")
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise CheckpointError(f"save target {target} holds the current working directory, which cannot be "
                              "replaced atomically; save into another folder (or change directory first)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder {target.parent} to save into: {e.strerror}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot save to {target}: saving writes a temporary folder beside it, and its "
                              f"parent {target.parent} is not writable")
    return target


def swap_in(new: Path, target: Path) -> Path | None:
    """Put the complete folder `new` at `target`; returns where the old folder now is (None if none)."""
    if not target.exists():
        try:
            os.rename(new, target)
            return None
        except OSError as e:  # another save created it meanwhile: swap with that one
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if exchange_folders(new, target):
        return new
    aside = target.parent / new.name.replace(NEW_TAG, OLD_TAG)
    old_lock = FolderLock(target)  # keeps `recover_stale` of a concurrent save off the old folder aside
    try:
        os.rename(target, aside)
        os.rename(new, target)
    finally:
        old_lock.release()
    return aside


@contextlib.contextmanager
def replacing_folder(target: str | os.PathLike, carry_over: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty temporary folder; on a normal exit, make it `target` atomically (see the module doc).

    carry_over(name): whether an entry of the old target that the caller did not write
    moves into the new folder (False drops it, e.g. weight files of an earlier save).
    On an exception the temporary folder is removed and the target left as it was.
    """
    target = check_target(Path(target))
    recover_stale(target)  # before anything is created: an old folder left aside goes back first
    target.mkdir(exist_ok=True)  # an empty folder stands for "no old checkpoint": the swap is then an exchange
    new = target.parent / f".{target.name}{NEW_TAG}{secrets.token_hex(4)}"
    os.mkdir(new)
    lock = FolderLock(new)
    committed = False
    try:
        yield new
        if target.is_dir():
            for name in sorted(os.listdir(target)):
                if not os.path.lexists(new / name) and carry_over(name):
                    link_tree(target / name, new / name)
        fsync_tree(new)
        old = swap_in(new, target)
        committed = True
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        lock.release()
        if not committed:
            shutil.rmtree(new, ignore_errors=True)
