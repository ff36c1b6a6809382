"""Patient data at rest: the folders medserve keeps it in, private to medserve's user, and files written whole.

Everything medserve writes (uploads, results, DICOM headers, WSI slides and heatmaps, audit lines) may identify a
patient, so it is readable by medserve's user alone: every process that writes sets the umask 077
(``set_private_umask``), so its files are 0600 and its folders 0700, and each storage folder is checked at start
(``private_folder``): one owned by another user, or writable by group or others, is refused, since whoever can write
it can replace what medserve stores there or read what it writes next.

Usage::

    set_private_umask()                           # first thing in a process that writes
    secure_storage(config)                         # at start: every storage folder exists, 0700, and is medserve's
    write_atomic(folder / "record.json", text)     # readers see the old file or the new one, never half
"""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import AppConfig

__all__ = ["PRIVATE_UMASK", "UnsafeStorage", "private_folder", "secure_storage", "set_private_umask", "write_atomic"]

PRIVATE_UMASK = 0o077  # files 0600, folders 0700


class UnsafeStorage(RuntimeError):
    """A storage folder that others could read or rewrite: medserve refuses to start on it."""


def set_private_umask() -> None:
    """Files and folders this process creates from now on are readable by its user only.

    The umask is the process's, so it covers what libraries write too (nibabel, Zarr, Pillow, logging's files).
    """
    os.umask(PRIVATE_UMASK)


def private_folder(path: Path) -> Path:
    """``path``, created 0700 if it is missing; ``UnsafeStorage`` if it is not a folder of this process's user
    that only that user may write.

    A folder that group or others may read but not write is accepted (an operator's choice, e.g. a backup
    group); what medserve writes in it is 0600 all the same.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = path.stat()  # the folder a symlink leads to: that is where the data goes
    me = os.geteuid()
    problems = []
    if not stat.S_ISDIR(found.st_mode):
        problems.append("is not a folder")
    if found.st_uid != me:
        problems.append(f"is owned by {_user(found.st_uid)}, not by {_user(me)} who runs medserve")
    if found.st_mode & 0o022:
        problems.append(f"is writable by group or others (mode {stat.S_IMODE(found.st_mode):04o})")
    if problems:
        raise UnsafeStorage(
            f"storage folder {path} {' and '.join(problems)}: whoever else can write it can replace or read the "
            f"patient data medserve keeps there. Give it to {_user(me)} with mode 0700 (chown {_user(me)} "
            f"{path}; chmod 700 {path}), or configure a folder of medserve's own (storage.root, "
            "storage.uploads_root, wsi.output_root, audit.directory)"
        )
    return path


def secure_storage(config: AppConfig) -> list[Path]:
    """Every folder the application ``config`` writes patient data to, created 0700 or checked
    (``private_folder``); refused with ``UnsafeStorage`` if any is not private."""
    storage = config.storage
    folders = [
        storage.root,
        storage.uploads,
        storage.results,
        config.wsi.output_root,
        config.audit.directory or storage.root / "audit",
    ]
    return [private_folder(folder) for folder in dict.fromkeys(folders)]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: readers see the old file or the new one, never half of it.

    The temporary file is made by ``mkstemp``, so it is 0600 whatever the umask and its name is unique to this
    write (two threads of one process saving the same record do not share it).
    """
    path = Path(path)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
