"""Writes that survive a crash or a power cut the moment they return: what the inbox and outbox answer for.

``storage.write_atomic`` makes a replacement whole for readers; these also make it durable: the file's bytes are
fsynced before it is renamed into place, and its folder after, so that its name survives too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["PARTIAL_SUFFIX", "fsync_folder", "write_durably"]

PARTIAL_SUFFIX = ".partial"  # a write a crash cut short: never acknowledged, deleted at start


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0600): readers see the old file or the new one, and once this returns the
    new one is on disk."""
    path = Path(path)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names just created in ``folder`` durable (a file's fsync covers its bytes, not its name)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
