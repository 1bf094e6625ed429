"""Writing files and folders a user keeps (checkpoints, results, predictions, generated data) so that a kill
at any moment leaves either the previous version or the new one under the final name, never a part of one.

Why not `tempfile`'s defaults: a temporary file in `$TMPDIR` is often on another filesystem (local /tmp, a
shared output disk); "renaming" it then copies into the target in place, and a kill mid-copy leaves a
truncated file where the good one was. So every temporary lives beside its target, in the same folder:

- a file is written to `.<name>.<8 hex>.tmp`, flushed, fsynced, renamed over the target with `os.replace`,
  and (POSIX) the folder is fsynced so the rename itself survives a power cut;
- a folder (a sharded checkpoint) is filled as the sibling `.<name>.<8 hex>.tmp` and swapped in
  (`replace_folder`): one atomic exchange where Linux and the filesystem offer it, else old folder renamed
  away to `.<name>.<8 hex>.old`, new one renamed in, old one deleted.

A kill leaves such temporaries behind; `remove_stray_temps` deletes them (and puts an orphaned `.old` folder
back if the kill fell between the two renames). The run layer calls it when it builds a trainer
(`piip.run.build.build_trainer`), for the folders that trainer writes to.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STRAY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}(?P<kind>\.tmp|\.old)$")


def temp_sibling(path: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """`.<name>.<8 hex><suffix>` in `path`'s folder: hidden, recognisable (`STRAY`), never a glob match of the
    real name (`last*.ckpt` does not match `.last.ckpt.1a2b3c4d.tmp`)."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def fsync_folder(folder: Path) -> None:
    """Make renames and new entries in `folder` durable (POSIX; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a folder about to be renamed into place)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(folder))


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """A stream whose content replaces `path` only when the block ends without an error.

    The temporary file is created like any new file (permissions from the umask, not `mkstemp`'s 0600)."""
    if "w" not in mode:
        raise ValueError(f"atomic_file writes whole files; got mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_json(path: str | Path, record: Any, indent: int | None = 2) -> Path:
    """Write atomically (`atomic_file`); `indent=None` writes compactly."""
    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as stream:
        json.dump(record, stream, indent=indent, sort_keys=True)
    return path


def write_torch(path: str | Path, obj: Any) -> Path:
    """`torch.save` atomically (`atomic_file`), for checkpoints."""
    import torch

    path = Path(path)
    with atomic_file(path) as stream:
        torch.save(obj, stream)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the kernel, the C
    library or the filesystem (NFS, many cluster filesystems) does not offer it."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(temp: Path, final: Path) -> None:
    """Put the complete folder `temp` (a sibling from `temp_sibling`) under the name `final`, replacing
    whatever is there, so that `final` always names a complete old or a complete new version.

    The caller has made `temp`'s content durable (`fsync_tree`)."""
    if not final.exists() and not final.is_symlink():
        os.rename(temp, final)
    elif _exchange(temp, final):
        _remove(temp)  # now the old version; a kill before this leaves a stray temp, nothing else
    else:
        old = temp_sibling(final, OLD_SUFFIX)
        os.rename(final, old)  # a kill right here leaves `.old` alone: remove_stray_temps renames it back
        os.rename(temp, final)
        _remove(old)
    fsync_folder(final.parent)


def remove_stray_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries a killed writer left in `folder` (not below it); returns what was removed.

    An `.old` folder whose final name is missing is the previous version of a folder swap cut between its
    two renames: it is renamed back instead. Only call this when no writer is active in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = STRAY.match(entry.name)
        if match is None:
            continue
        final = folder / match["name"]
        if match["kind"] == OLD_SUFFIX and not final.exists():
            with contextlib.suppress(FileNotFoundError):
                os.rename(entry, final)
                log.warning("restored %s from %s (a folder swap was interrupted)", final, entry.name)
            continue
        with contextlib.suppress(FileNotFoundError):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d stray temporary file(s) in %s: %s", len(removed), folder, removed)
    return removed
