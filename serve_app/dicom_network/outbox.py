"""The outbox: results waiting to be delivered to their destinations, on disk, so nothing is lost to a restart.

One entry per (series, model, model version, destination), in ``<root>/<delivery id>/``: the result's files
(``files/``) and its record (``delivery.json``), written durably before ``enqueue`` returns. An entry is

- ``pending``: not yet taken by its destination; tried again after a pause that doubles each time
  (``delivery_first_retry_s`` .. ``delivery_max_retry_s``), its last error kept;
- ``delivered``: the destination took every file;
- ``failed``: the destination refused it, or stayed down for ``delivery_attempts`` tries.

The delivery id is a hash of the series, model, version and destination: enqueuing the same again (the series was
re-sent, or processed again after a restart) finds the entry and sends nothing more, unless asked to
(``enqueue(..., resend=True)``, ``resend(id)``). A new ``Outbox`` over the same folder carries on where the last
stopped: its pending entries are tried when they are due.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.dicom_network.inbox import uid_key
from serve_app.durable import write_durably
from serve_app.errors import DeliveryFailed
from serve_app.observability import metrics
from serve_app.storage import private_folder

__all__ = ["Delivery", "DeliveryState", "Outbox", "RetryPolicy", "SeriesResult"]

DeliveryState = Literal["pending", "delivered", "failed"]
_RECORD_FILE = "delivery.json"
_FILES = "files"
_IDLE_WAIT_S = 1.0  # the longest the scheduler sleeps: gauges (the oldest pending's age) stay current


@dataclass(frozen=True)
class SeriesResult:
    """What a ``SeriesProcessor`` made of a series for one route: the result and its files to deliver.

    Args:
        tenant: the series' tenant.
        study_instance_uid, series_instance_uid: the source series.
        model, model_version: the model that made the result (its version as run, not as asked).
        result_id: the result's id in medserve's result store.
        files: DICOM Part-10 files to deliver (the DICOM SEG and SR); copied into the outbox.
    """

    tenant: str
    study_instance_uid: str
    series_instance_uid: str
    model: str
    model_version: str
    result_id: str
    files: tuple[Path, ...]


class Delivery(BaseModel):
    """One result on its way to one destination: what ``GET /v1/deliveries`` lists."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The delivery's id: the same for the same series, model version and destination.")
    tenant: str = Field(description="The tenant whose result it is.")
    destination: str = Field(description="The destination's name in the config.")
    study_instance_uid: str = Field(description="StudyInstanceUID of the source series.")
    series_instance_uid: str = Field(description="SeriesInstanceUID of the source series.")
    model: str = Field(description="The model that made the result.")
    model_version: str = Field(description="Its version.")
    result_id: str = Field(description="The result's id (GET /v1/results/{result_id}).")
    files: int = Field(description="DICOM instances to deliver.")
    state: DeliveryState = Field(description="pending, delivered or failed.")
    attempts: int = Field(0, description="Tries so far.")
    last_error: str | None = Field(None, description="Why the last try failed; null if none has.")
    created: datetime = Field(description="When it was queued (UTC).")
    next_attempt: datetime | None = Field(None, description="When it is tried next (UTC); null unless pending.")
    finished: datetime | None = Field(None, description="When it was delivered or given up (UTC).")


@dataclass(frozen=True)
class RetryPolicy:
    """How long a pending delivery waits between tries, and how many it gets."""

    attempts: int
    first_pause_s: float
    max_pause_s: float

    def pause_after(self, attempts: int) -> float:
        return min(self.first_pause_s * 2 ** (attempts - 1), self.max_pause_s)


class Outbox:
    """Deliveries under ``root`` (0700), tried by a scheduler thread from ``start`` until ``stop``.

    Args:
        root: the outbox's folder; entries already in it are carried on with.
        deliver: sends one delivery's files to its destination by name, or raises ``DeliveryFailed``
            (``Destinations.deliver``).
        retry: pauses and tries.
    """

    def __init__(self, root: Path, deliver: Callable[[str, Sequence[Path]], None], retry: RetryPolicy):
        self.root = private_folder(root)
        self._deliver, self._retry = deliver, retry
        self._lock = threading.Condition()
        self._entries: dict[str, Delivery] = {}
        self._in_flight: set[str] = set()  # destinations with a delivery being sent: one at a time, in order
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._senders: ThreadPoolExecutor | None = None
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                self._entries[folder.name] = Delivery.model_validate_json((folder / _RECORD_FILE).read_bytes())
            except FileNotFoundError:  # an enqueue a crash cut short: it never returned
                shutil.rmtree(folder)

    def enqueue(self, result: SeriesResult, destination: str, resend: bool = False) -> Delivery:
        """Queue ``result`` for ``destination`` (durably); the delivery already queued for the same series, model
        version and destination if there is one, unless ``resend``."""
        delivery_id = uid_key(
            "\0".join((result.series_instance_uid, result.model, result.model_version, destination, result.tenant))
        )
        with self._lock:
            existing = self._entries.get(delivery_id)
            if existing is not None and not resend:
                return existing
            if existing is not None and existing.state == "pending" and existing.result_id == result.result_id:
                return existing
        folder = self.root / delivery_id
        shutil.rmtree(folder, ignore_errors=True)  # an earlier result's files, asked to be sent anew
        files = folder / _FILES
        files.mkdir(parents=True, mode=0o700)
        for number, path in enumerate(result.files):
            write_durably(files / f"{number:04d}.dcm", Path(path).read_bytes())
        now = datetime.now(UTC)
        delivery = Delivery(
            id=delivery_id,
            tenant=result.tenant,
            destination=destination,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=result.series_instance_uid,
            model=result.model,
            model_version=result.model_version,
            result_id=result.result_id,
            files=len(result.files),
            state="pending",
            created=now,
            next_attempt=now,
        )
        with self._lock:
            self._save(delivery)
            self._lock.notify_all()
        return delivery

    def resend(self, delivery_id: str) -> Delivery:
        """Send a delivered or failed delivery again (its files are kept until it is swept); ``KeyError`` if
        there is no such delivery."""
        with self._lock:
            delivery = self._entries[delivery_id]
            if delivery.state != "pending":
                now = datetime.now(UTC)
                update = {"state": "pending", "attempts": 0, "next_attempt": now, "finished": None}
                self._save(delivery.model_copy(update=update))
                self._lock.notify_all()
            return self._entries[delivery_id]

    def deliveries(self, tenant: str | None = None) -> list[Delivery]:
        """Every delivery (of ``tenant``), the newest first."""
        with self._lock:
            found = [d for d in self._entries.values() if tenant is None or d.tenant == tenant]
        return sorted(found, key=lambda d: d.created, reverse=True)

    def sweep(self, keep_s: float) -> None:
        """Forget the deliveries finished more than ``keep_s`` ago, and delete their files."""
        cutoff = datetime.now(UTC) - timedelta(seconds=keep_s)
        with self._lock:
            expired = [d.id for d in self._entries.values() if d.finished is not None and d.finished < cutoff]
            for delivery_id in expired:
                del self._entries[delivery_id]
        for delivery_id in expired:
            shutil.rmtree(self.root / delivery_id, ignore_errors=True)

    def start(self) -> None:
        self._senders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medserve-delivery")
        self._scheduler = threading.Thread(target=self._schedule, name="medserve-outbox", daemon=True)
        self._scheduler.start()

    def stop(self) -> None:
        """Stop trying; a delivery being sent finishes first."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._scheduler is not None:
            self._scheduler.join()
            self._senders.shutdown(wait=True)

    def _schedule(self) -> None:
        with self._lock:
            while not self._stopping:
                now = datetime.now(UTC)
                pending = sorted(
                    (d for d in self._entries.values() if d.state == "pending"), key=lambda d: d.next_attempt
                )
                for delivery in pending:
                    if delivery.next_attempt <= now and delivery.destination not in self._in_flight:
                        self._in_flight.add(delivery.destination)
                        self._senders.submit(self._send, delivery)
                self._report(pending, now)
                waits = [(d.next_attempt - now).total_seconds() for d in pending if d.next_attempt > now]
                self._lock.wait(timeout=min([_IDLE_WAIT_S, *waits]))

    def _send(self, delivery: Delivery) -> None:
        files = sorted((self.root / delivery.id / _FILES).iterdir())
        error = None
        try:
            self._deliver(delivery.destination, files)
        except DeliveryFailed as failure:
            error = failure
        now = datetime.now(UTC)
        attempts = delivery.attempts + 1
        if error is None:
            update = {"state": "delivered", "attempts": attempts, "next_attempt": None, "finished": now}
        elif error.transient and attempts < self._retry.attempts:
            pause = timedelta(seconds=self._retry.pause_after(attempts))
            update = {"attempts": attempts, "last_error": error.reason, "next_attempt": now + pause}
        else:
            update = {"state": "failed", "attempts": attempts, "last_error": error.reason, "next_attempt": None}
            update["finished"] = now
        with self._lock:
            current = self._entries.get(delivery.id)
            if current is not None and current.created == delivery.created:  # not re-queued while it was sent
                self._save(current.model_copy(update=update))
                metrics.count_delivery(delivery.destination, update.get("state", "retried"))
            self._in_flight.discard(delivery.destination)
            self._lock.notify_all()

    def _save(self, delivery: Delivery) -> None:
        write_durably(self.root / delivery.id / _RECORD_FILE, delivery.model_dump_json().encode())
        self._entries[delivery.id] = delivery

    def _report(self, pending: list[Delivery], now: datetime) -> None:
        for destination in {d.destination for d in self._entries.values()}:
            waiting = [d for d in pending if d.destination == destination]
            oldest = min((d.created for d in waiting), default=now)
            metrics.set_delivery_backlog(destination, len(waiting), (now - oldest).total_seconds())
