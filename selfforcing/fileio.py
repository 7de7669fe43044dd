"""Atomic file writes: everything the project writes (checkpoints, store shards and manifests, embedding caches,
videos) goes through a temp file in the same directory and a rename, so a kill never leaves a broken file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

TEMP_PREFIX = ".tmp-"  # every temp file and folder of an atomic write starts with this


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: not every OS can fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_beside(path: str | os.PathLike) -> str:
    """A new empty temp file in ``path``'s folder (created with its parents), named ``.tmp-XXXX-<name>``, for
    :func:`commit_temp` to rename over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path))
    os.close(fd)
    return tmp


def commit_temp(tmp: str, path: str | os.PathLike) -> None:
    """fsync ``tmp``, give it the usual permissions (mkstemp makes 0600) and rename it over ``path``."""
    path = os.fspath(path)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def discard_temp(tmp: str) -> None:
    """Remove a temp file if it is still there."""
    if os.path.exists(tmp):
        os.remove(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, fsync the temp file, then rename it over ``path`` (same directory).

    On any failure the temp file is removed and ``path`` is left as it was."""
    tmp = temp_beside(path)
    try:
        write(tmp)
        commit_temp(tmp, path)
    except BaseException:
        discard_temp(tmp)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temp files and folders (``.tmp-*``) that killed writes left directly inside ``folder``; returns
    their paths. Call it only where no other process is writing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(TEMP_PREFIX):
            continue
        full = os.path.join(folder, name)
        try:
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        except FileNotFoundError:
            continue
        removed.append(full)
    return removed


def replace_folder(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the finished folder ``tmp`` to ``folder`` (same parent), replacing an existing ``folder``: that one is
    first renamed to a ``.tmp-`` name and removed after, so a kill leaves ``folder`` complete (old or new) or
    absent, and the leftover is removed by :func:`remove_stale_temps`."""
    tmp, folder = os.fspath(tmp), os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    old = None
    if os.path.exists(folder):
        old = tempfile.mkdtemp(dir=parent, prefix=TEMP_PREFIX + "old-")
        os.rmdir(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError naming ``path`` unless a file can be written there (before any long work): ``path`` must not be
    a folder, and the nearest existing folder on its way must take a new file (checked by creating and removing
    one, so permissions, read-only mounts and full quotas all count)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX + "check-")
    except OSError as err:
        raise PermissionError(f"cannot write {path}: the folder {folder} does not take new files "
                              f"({err.strerror or err})") from None
    os.close(fd)
    os.remove(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)
