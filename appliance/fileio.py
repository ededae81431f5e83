"""Crash-safe file replacement for config and state files."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    The data goes to a temporary file in the same directory (so the rename cannot
    cross file systems), is fsynced, renamed over ``path`` and then the directory
    is fsynced so the rename itself survives a power cut.

    Permission bits are ``mode`` if given, else those of the existing file, else
    0600 (the files may hold passwords). The owner and group of an existing file
    are kept where the process is allowed to. If ``path`` is a symlink, the file
    it points to is replaced, not the link.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    target = Path(os.path.realpath(path))
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    if mode is None and old is not None:
        mode = stat.S_IMODE(old.st_mode)

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            if old is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(tmp.fileno(), old.st_uid, old.st_gid)
            if mode is not None:
                os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a completed rename in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
