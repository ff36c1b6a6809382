"""``DicomNode``: the listener, inbox, series completion, routing and outbox of one medserve DICOM node, together.

What the node does with a routed series is not its own business: it calls a ``SeriesProcessor`` once per route
that took the series, and queues what that returns for the route's destinations. The processor is the seam to the
segmentation pipeline (a Serve deployment calls the segmentation service there); the node itself needs no Ray.

Usage::

    node = DicomNode(config, processor, AuditLog(config.audit, config.storage.root, "dicom-node"))
    port = node.start()          # listening; series left complete by a restart are processed again
    ...
    node.outbox.deliveries(tenant)   # GET /v1/deliveries
    node.stop()
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from serve_app.config import AppConfig
from serve_app.dicom_network.delivery import Destinations
from serve_app.dicom_network.inbox import Inbox, ReceivedInstance
from serve_app.dicom_network.listener import Arrival, DicomListener
from serve_app.dicom_network.outbox import Outbox, RetryPolicy, SeriesResult
from serve_app.dicom_network.routing import Route, SeriesFacts, match_routes
from serve_app.dicom_network.series import CompletedSeries, SeriesBook, SeriesRecord
from serve_app.errors import DimseStatus, InstanceRefused, RequestError
from serve_app.observability import metrics
from serve_app.storage import private_folder
from serve_app.tenancy.audit import AuditLog

__all__ = ["DicomNode", "SeriesProcessor"]

LOGGER = logging.getLogger(__name__)

# Runs ``route``'s model on a complete series; returns the result to deliver to the route's destinations. Called
# from a worker thread of the node, at most ``processing_workers`` at once; a RequestError's reason is recorded as
# the route's outcome (it names no patient data), any other exception by its type.
SeriesProcessor = Callable[[CompletedSeries, Route], SeriesResult]

_WATCH_INTERVAL_S = 0.25  # how often complete series are looked for: a series is routed at most this late
_SWEEP_INTERVAL_S = 60.0


class DicomNode:
    """One DICOM node of ``config`` (its ``dicom_network``, ``routes`` and ``destinations`` sections).

    Args:
        config: the application's config; ``dicom_network`` must be set.
        processor: runs a route's model on a series (see ``SeriesProcessor``).
        audit: where associations and each series' routing are recorded (no patient data: the study's UID only
            as the audit log's salted hash).

    Attributes:
        receiving: a folder (0700) on the inbox's filesystem for the listener's receiving files. pynetdicom
            receives each data set into a file in ``tempfile``'s folder; a process that makes this that folder
            (``tempfile.tempdir``: the node's replica does) has each instance filed by a hard link, its bytes
            written once; elsewhere the inbox copies them.
    """

    def __init__(self, config: AppConfig, processor: SeriesProcessor, audit: AuditLog):
        if config.dicom_network is None:
            raise ValueError("dicom_network is not configured: there is no DICOM node to start")
        self.config, self.network = config, config.dicom_network
        self._processor, self._audit = processor, audit
        folder = private_folder(self.network.folder_under(config.storage.root, config.name))
        self.book = SeriesBook(Inbox(folder / "inbox"), self.network.stable_after_s)
        # Where the listener's receiving files belong (see ``receiving``); one left here was never acknowledged.
        self.receiving = private_folder(folder / "receiving")
        for leftover in self.receiving.iterdir():
            leftover.unlink()
        retry = RetryPolicy(
            self.network.delivery_attempts, self.network.delivery_first_retry_s, self.network.delivery_max_retry_s
        )
        self.outbox = Outbox(folder / "outbox", Destinations(config.destinations, config.pacs).deliver, retry)
        self.listener = DicomListener(self.network, self._receive, audit, self._has_room)
        self._workers = ThreadPoolExecutor(self.network.processing_workers, thread_name_prefix="medserve-series")
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="medserve-series-watch", daemon=True)

    @property
    def port(self) -> int:
        return self.listener.port

    def start(self) -> int:
        """Carry on with what the last node over the same folder left, then listen; the port listened on."""
        for completed in self.book.restore():
            self._workers.submit(self._process, completed)
        self.outbox.start()
        self._watcher.start()
        return self.listener.start()

    def healthy(self) -> bool:
        """Whether it still listens and still watches for complete series (a deployment's health check)."""
        return self._watcher.is_alive() and not self._stopping.is_set() and self.listener.listening

    def stop(self) -> None:
        """Stop listening, let series being processed and deliveries being sent finish, stop."""
        self.listener.stop()
        self._stopping.set()
        self._watcher.join()
        self._workers.shutdown(wait=True)
        self.outbox.stop()

    def _has_room(self, tenant: str) -> bool:
        """Whether ``tenant``'s instances received and not yet processed are under its limits."""
        limits = self.network.limits
        instances, size = self.book.pending(tenant)
        return instances < limits.max_inbox_instances_per_tenant and size < limits.max_inbox_bytes_per_tenant

    def _receive(self, arrival: Arrival) -> bool:
        if not self._has_room(arrival.tenant):  # filled by another association since the listener looked
            raise InstanceRefused("tenant's inbox is full", DimseStatus.OUT_OF_RESOURCES)
        header = arrival.header
        record = SeriesRecord(
            tenant=arrival.tenant,
            called_ae_title=arrival.called_ae_title,
            calling_ae_title=arrival.calling_ae_title,
            study_instance_uid=header.StudyInstanceUID,
            series_instance_uid=header.SeriesInstanceUID,
            first_received=datetime.now(UTC),
        )
        folder = self.book.open(record)
        instance = ReceivedInstance(
            arrival.tenant, header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID, arrival.received
        )
        if not self.book.inbox.store(instance):
            return False
        self.book.arrived(folder, arrival.size)
        return True

    def _watch(self) -> None:
        since_sweep = 0.0
        while not self._stopping.wait(_WATCH_INTERVAL_S):
            for completed in self.book.complete():
                self._workers.submit(self._process, completed)
            for tenant, instances in self.book.depth().items():
                metrics.set_dicom_inbox_depth(tenant, instances)
            since_sweep += _WATCH_INTERVAL_S
            if since_sweep >= _SWEEP_INTERVAL_S:
                keep_s = self.network.keep_processed_series_hours * 3600
                self.book.sweep(keep_s)
                self.outbox.sweep(keep_s)
                since_sweep = 0.0

    def _process(self, completed: CompletedSeries) -> None:
        record = completed.record
        facts = SeriesFacts(completed.header(), len(completed.files), record.tenant, record.called_ae_title)
        routes = match_routes(facts, self.config.routes)
        outcomes = {route.name: self._run(completed, route) for route in routes}
        self.book.processed(completed, outcomes)
        metrics.count_dicom_series(record.tenant, routed=bool(routes))
        self._audit.write(
            {
                "request_id": uuid.uuid4().hex,
                "route": "dicom-series",
                "outcome": "routed" if routes else "no route",
                "tenant": record.tenant,
                "called_ae_title": record.called_ae_title,
                "calling_ae_title": record.calling_ae_title,
                "study": self._audit.study_hash(record.study_instance_uid),
                "instances": len(completed.files),
                "routes": outcomes,
            }
        )

    def _run(self, completed: CompletedSeries, route: Route) -> str:
        """Process the series for ``route`` and queue its result for the route's destinations; what came of it."""
        try:
            result = self._processor(completed, route)
        except RequestError as e:
            return f"failed: {e.reason}"
        except Exception as e:
            LOGGER.exception("processing a series for route %s failed", route.name)
            return f"failed: {type(e).__name__}"
        for destination in route.destinations:
            self.outbox.enqueue(result, destination)
        return "processed"
