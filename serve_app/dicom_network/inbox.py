"""The inbox: every instance received, on disk (flushed, its name too) before its C-STORE is answered Success.

One folder per series, ``<root>/<tenant>/<series key>/``, one file per instance, ``<instance key>.dcm``, written as
the sender encoded it (Part 10, no decoding and re-encoding). Keys are hashes of the UIDs: a UID is the sender's
text and never becomes a path. An instance already on disk is not written again, so a re-send is idempotent.

Durability, in the order a crash could interrupt it. Where the listener's receiving file is on the inbox's own
filesystem (the DICOM node's replica receives into ``DicomNode.receiving``), it is flushed (``fdatasync``) and given
the instance's name by a hard link, and the folder is fsynced so that the name survives too: the bytes are written
once. Elsewhere they are copied to a temporary file that is flushed, renamed to the instance's name, and the folder
fsynced; a crash before the rename leaves a ``.partial`` file that ``Inbox`` deletes at start. Either way, once the
name exists the instance is whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serve_app.durable import PARTIAL_SUFFIX, copy_durably, fsync_folder, link_durably
from serve_app.storage import private_folder

__all__ = ["INSTANCE_SUFFIX", "Inbox", "ReceivedInstance", "uid_key"]

INSTANCE_SUFFIX = ".dcm"


def uid_key(uid: str) -> str:
    """A file name for ``uid``: its SHA-256, shortened (128 bits: no two UIDs of a site will share it)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE's instance as the listener received it.

    Args:
        tenant: the tenant of the called AE title.
        study_instance_uid, series_instance_uid, sop_instance_uid: from its header.
        received: the Part-10 file as received (preamble, file meta and data set), which is linked or copied.
    """

    tenant: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    received: Path


class Inbox:
    """Received instances under ``root`` (created 0700, refused if others may write it)."""

    def __init__(self, root: Path):
        self.root = private_folder(root)
        for partial in self.root.glob(f"*/*/.*{PARTIAL_SUFFIX}"):  # writes a crash cut short: never acknowledged
            partial.unlink()

    def series_folder(self, tenant: str, series_instance_uid: str) -> Path:
        return self.root / tenant / uid_key(series_instance_uid)

    def create_series_folder(self, tenant: str, series_instance_uid: str) -> Path:
        """The series' folder, created (and its name made durable) if it is new."""
        folder = self.series_folder(tenant, series_instance_uid)
        if not folder.is_dir():
            tenant_folder = self.root / tenant
            if not tenant_folder.is_dir():
                tenant_folder.mkdir(mode=0o700, exist_ok=True)
                fsync_folder(self.root)
            folder.mkdir(mode=0o700, exist_ok=True)
            fsync_folder(tenant_folder)
        return folder

    def store(self, instance: ReceivedInstance) -> bool:
        """Write ``instance`` durably into its series' folder (which must exist); False if it was there already."""
        folder = self.series_folder(instance.tenant, instance.series_instance_uid)
        final = folder / f"{uid_key(instance.sop_instance_uid)}{INSTANCE_SUFFIX}"
        if final.exists():
            return False
        if os.stat(instance.received).st_dev != os.stat(folder).st_dev:
            copy_durably(final, instance.received)
            return True
        try:
            link_durably(final, instance.received)
        except FileExistsError:  # the same instance, stored by another association just now
            return False
        return True

    def series_folders(self) -> Iterator[tuple[str, Path]]:
        """(tenant, folder) of every series in the inbox."""
        for tenant_folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for folder in sorted(p for p in tenant_folder.iterdir() if p.is_dir()):
                yield tenant_folder.name, folder

    @staticmethod
    def instances(folder: Path) -> list[Path]:
        """The series' instance files, in a stable order."""
        return sorted(folder.glob(f"*{INSTANCE_SUFFIX}"))

    @staticmethod
    def remove(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
