"""Writes that survive a crash or a power cut the moment they return: what the inbox and outbox answer for.

``storage.write_atomic`` makes a replacement whole for readers; these also make it durable: the file's bytes are
flushed (``fdatasync``) before it is renamed into place, and its folder (``fsync``) after, so that its name survives
too. ``fdatasync`` is as strong as ``fsync`` here: it flushes the data and the metadata needed to read it back (the
file's size and blocks: POSIX synchronized I/O data integrity), and skips only what no reader of these files needs
(its times). A file's flush does not make its name durable: that is the folder's fsync.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["PARTIAL_SUFFIX", "copy_durably", "fsync_folder", "link_durably", "write_durably"]

PARTIAL_SUFFIX = ".partial"  # a write a crash cut short: never acknowledged, deleted at start


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0600): readers see the old file or the new one, and once this returns the
    new one is on disk."""
    _replace_durably(Path(path), lambda file: file.write(data))


def copy_durably(path: Path, source: Path) -> None:
    """Replace ``path`` with a copy of the file ``source`` (0600), as ``write_durably``; the bytes go from file to
    file (the kernel's copy where it can), never whole in memory."""

    def copy(file: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, file, length=1 << 20)

    _replace_durably(Path(path), copy)


def link_durably(path: Path, source: Path) -> None:
    """Give the file ``source`` the new name ``path`` on the same filesystem (a hard link: its bytes are not written
    again), durably: its bytes flushed first, then the name with its folder. The file becomes 0600; ``source``
    keeps its own name, for its owner to remove. Raises ``FileExistsError`` if ``path`` exists."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.link(source, path)
    fsync_folder(Path(path).parent)


def _replace_durably(path: Path, write: Callable[[BinaryIO], object]) -> None:
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fdatasync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names just created in ``folder`` durable (a file's flush covers its bytes, not its name)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
