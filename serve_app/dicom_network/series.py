"""Series completion: a series is complete once no instance of it has arrived for ``stable_after_s``.

Each series of the inbox has a record beside its instances (``series.json``, written durably) that says where it
is: ``receiving``, ``complete`` (routed, being processed) or ``processed``. The record is what survives a restart:
a series found ``receiving`` starts its stability clock again (its sender, cut off by the restart, gets
``stable_after_s`` to re-send the rest), one found ``complete`` is processed again (a delivery already queued for
it is not sent twice: see ``outbox``), one ``processed`` is kept until ``keep_processed_series_hours`` have passed.

``SeriesBook`` is the in-memory index of those records, with each tenant's count of instances and bytes received
and not yet processed, which the listener's per-tenant limits are checked against.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field

from serve_app.dicom_network.inbox import Inbox
from serve_app.durable import write_durably

__all__ = ["CompletedSeries", "SeriesBook", "SeriesRecord", "SeriesState"]

SeriesState = Literal["receiving", "complete", "processed"]
_RECORD_FILE = "series.json"


class SeriesRecord(BaseModel):
    """What the node knows of one series of its inbox, kept beside its instances."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(description="The tenant of the called AE title.")
    called_ae_title: str = Field(description="medserve's AE title the series was sent to.")
    calling_ae_title: str = Field(description="The sender's AE title.")
    study_instance_uid: str = Field(description="StudyInstanceUID of its instances.")
    series_instance_uid: str = Field(description="SeriesInstanceUID of its instances.")
    state: SeriesState = Field("receiving", description="receiving, complete (routed, processing) or processed.")
    first_received: datetime = Field(description="When its first instance arrived (UTC).")
    completed: datetime | None = Field(None, description="When it was last found complete (UTC).")
    instances: int = Field(0, description="Instances of it on disk when it was last found complete.")
    routes: dict[str, str] = Field(
        {}, description="Each route that took it, and what came of it: processed, or the reason it failed."
    )

    def save(self, folder: Path) -> None:
        write_durably(folder / _RECORD_FILE, self.model_dump_json().encode())

    @classmethod
    def load(cls, folder: Path) -> SeriesRecord | None:
        """The folder's record; None if it has none (a crash before its first instance was acknowledged)."""
        try:
            return cls.model_validate_json((folder / _RECORD_FILE).read_bytes())
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class CompletedSeries:
    """A series no instance of which has arrived for ``stable_after_s``: what routing and a ``SeriesProcessor``
    get. Its instances stay in ``folder`` until it has been processed and kept its while."""

    record: SeriesRecord
    folder: Path
    files: tuple[Path, ...]

    @property
    def tenant(self) -> str:
        return self.record.tenant

    def header(self) -> pydicom.Dataset:
        """The header of its first instance (pixel data not read): the series-level tags routes match."""
        return pydicom.dcmread(self.files[0], stop_before_pixels=True)


@dataclass
class _OpenSeries:
    record: SeriesRecord
    folder: Path
    last_arrival: float  # time.monotonic()
    instances: int = 0
    bytes: int = 0


@dataclass
class _Pending:
    instances: int = 0
    bytes: int = 0


@dataclass
class SeriesBook:
    """The inbox's series and their state; thread-safe (the listener's associations call it at once).

    Args:
        inbox: the instances on disk.
        stable_after_s: quiet time after which a series is complete.
    """

    inbox: Inbox
    stable_after_s: float
    _series: dict[Path, _OpenSeries] = field(default_factory=dict, init=False)
    _pending: dict[str, _Pending] = field(default_factory=lambda: defaultdict(_Pending), init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def restore(self) -> list[CompletedSeries]:
        """Read every record of the inbox (at start); the series found complete but not processed, to process
        again."""
        now, unfinished = time.monotonic(), []
        for tenant, folder in self.inbox.series_folders():
            record = SeriesRecord.load(folder)
            if record is None or record.tenant != tenant:
                Inbox.remove(folder)
                continue
            files = Inbox.instances(folder)
            series = _OpenSeries(record, folder, now, len(files), sum(f.stat().st_size for f in files))
            self._series[folder] = series
            if record.state != "processed":
                self._pending[tenant].instances += series.instances
                self._pending[tenant].bytes += series.bytes
            if record.state == "complete":
                unfinished.append(CompletedSeries(record, folder, tuple(files)))
        return unfinished

    def pending(self, tenant: str) -> tuple[int, int]:
        """Instances and bytes of ``tenant`` received and not yet processed."""
        with self._lock:
            pending = self._pending[tenant]
            return pending.instances, pending.bytes

    def depth(self) -> dict[str, int]:
        """Instances received and not yet processed, per tenant."""
        with self._lock:
            return {tenant: pending.instances for tenant, pending in self._pending.items()}

    def open(self, record: SeriesRecord) -> Path:
        """The folder of ``record``'s series, its record written first if the series is new."""
        folder = self.inbox.series_folder(record.tenant, record.series_instance_uid)
        with self._lock:
            if folder in self._series:
                return folder
            folder = self.inbox.create_series_folder(record.tenant, record.series_instance_uid)
            record.save(folder)
            self._series[folder] = _OpenSeries(record, folder, time.monotonic())
            return folder

    def arrived(self, folder: Path, size: int) -> None:
        """A new instance of ``size`` bytes is on disk in ``folder``: the series' clock starts again; a series
        complete or processed is received again (an instance was added to it)."""
        with self._lock:
            series = self._series[folder]
            series.last_arrival = time.monotonic()
            series.instances += 1
            series.bytes += size
            pending = self._pending[series.record.tenant]
            if series.record.state == "processed":  # its instances were no longer counted: they are again
                pending.instances += series.instances - 1
                pending.bytes += series.bytes - size
            pending.instances += 1
            pending.bytes += size
            if series.record.state != "receiving":
                series.record = series.record.model_copy(update={"state": "receiving", "routes": {}})
                series.record.save(folder)

    def complete(self) -> list[CompletedSeries]:
        """The series that have just become complete, marked so (durably)."""
        now, found = time.monotonic(), []
        with self._lock:
            due = [
                series
                for series in self._series.values()
                if series.record.state == "receiving" and now - series.last_arrival >= self.stable_after_s
            ]
        for series in due:
            files = Inbox.instances(series.folder)
            with self._lock:
                if series.record.state != "receiving" or now < series.last_arrival:  # an instance came meanwhile
                    continue
                series.record = series.record.model_copy(
                    update={"state": "complete", "completed": datetime.now(UTC), "instances": len(files)}
                )
                series.record.save(series.folder)
            found.append(CompletedSeries(series.record, series.folder, tuple(files)))
        return found

    def processed(self, completed: CompletedSeries, routes: dict[str, str]) -> None:
        """Record what each route made of ``completed``; its instances no longer count against its tenant."""
        with self._lock:
            series = self._series.get(completed.folder)
            if (
                series is None
                or series.record.state != "complete"
                or series.record.completed != completed.record.completed
            ):
                return  # received again while it was processed: it will be complete again
            series.record = series.record.model_copy(update={"state": "processed", "routes": routes})
            series.record.save(series.folder)
            pending = self._pending[series.record.tenant]
            pending.instances -= series.instances
            pending.bytes -= series.bytes

    def sweep(self, keep_s: float) -> None:
        """Delete the series processed more than ``keep_s`` ago."""
        cutoff = datetime.now(UTC).timestamp() - keep_s
        with self._lock:
            expired = [
                folder
                for folder, series in self._series.items()
                if series.record.state == "processed" and series.record.completed.timestamp() < cutoff
            ]
            for folder in expired:
                del self._series[folder]
        for folder in expired:
            Inbox.remove(folder)
