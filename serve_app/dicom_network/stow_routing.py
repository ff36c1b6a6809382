"""``StowRouting``: a STOW-RS push that names no model (``POST /dicomweb/studies``) routed as a C-STORE'd series is.

A PACS configured for DICOMweb rather than DIMSE gets the same behaviour as one sending to the node's AE title: the
pushed instances are spooled once, grouped by series, and each series goes to every route whose ``match`` it meets
(``match_routes``; it was sent to no AE title, so a route that names ``called_ae_titles`` never takes it). Each
route's model segments it as a segment request of its own (quotas, audit), and its DICOM SEG and SR are handed to
the node's outbox for the route's destinations. A series no route takes is not processed.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom

from serve_app.config import AppConfig
from serve_app.dicom_network.deliveries import DeliveriesService
from serve_app.dicom_network.pipeline import copied_series, series_result
from serve_app.dicom_network.routing import Route, SeriesFacts, match_routes
from serve_app.dicomweb.stow import StowBody
from serve_app.errors import InvalidStudy
from serve_app.results import ResultStore
from serve_app.segmentation.responses import SegmentResponse
from serve_app.segmentation.service import Receive
from serve_app.studies.upload import UploadBudget
from serve_app.tenancy.gatekeeper import Visit

__all__ = ["RoutedSeries", "StowRouting"]


@dataclass(frozen=True)
class RoutedSeries:
    """One series of a push and the routes that took it (none: not processed)."""

    study_instance_uid: str
    series_instance_uid: str
    files: tuple[Path, ...]
    routes: tuple[Route, ...]

    @property
    def receive(self) -> Receive:
        """A segmentation's ``Receive`` of this series (copied from the spool)."""
        return copied_series(self.files)


class StowRouting:
    """The ``routes`` of one application, for STOW-RS pushes.

    Args:
        config: the application's config: ``routes``, ``storage`` (the spool is an upload folder), ``limits``.
        results: where a routed series' result is kept (its SEG and SR are built there to be delivered).
        deliveries: the DICOM node's outbox.
    """

    def __init__(self, config: AppConfig, results: ResultStore, deliveries: DeliveriesService):
        self.routes, self.uploads = config.routes, config.storage.uploads
        self.max_files = config.limits.max_files_per_upload
        self.results, self.deliveries = results, deliveries

    @asynccontextmanager
    async def spooled(self, body: StowBody, visit: Visit) -> AsyncIterator[list[RoutedSeries]]:
        """The push's series, each with the routes that take it, spooled within the visit's upload budget; the
        spool is deleted when the block ends."""
        folder = self.uploads / f"{visit.request_id}-stow"
        folder.mkdir(parents=True)
        try:
            await body.receive(folder, UploadBudget(max_bytes=visit.max_upload_bytes, max_files=self.max_files))
            yield await asyncio.to_thread(self._routed, folder, visit.tenant_id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def taken(pushed: list[RoutedSeries]) -> list[tuple[RoutedSeries, Route]]:
        """Each series of a push with each route that took it, in order."""
        return [(series, route) for series in pushed for route in series.routes]

    async def deliver(self, series: RoutedSeries, route: Route, answer: SegmentResponse, tenant_id: str) -> None:
        """Hand the result's SEG and SR to the outbox for the route's destinations (none: kept in medserve only)."""
        if not route.destinations:
            return
        result = await series_result(
            self.results, answer, tenant_id, series.study_instance_uid, series.series_instance_uid
        )
        await self.deliveries.enqueue(result, list(route.destinations))

    def _routed(self, folder: Path, tenant_id: str) -> list[RoutedSeries]:
        by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
        for path in sorted(folder.iterdir()):
            header = pydicom.dcmread(path, stop_before_pixels=True)
            series_uid = str(header.get("SeriesInstanceUID") or "").strip()
            if not series_uid:
                raise InvalidStudy("an instance of the STOW-RS body has no SeriesInstanceUID")
            by_series[series_uid].append((path, header))
        routed = []
        for series_uid, instances in by_series.items():
            header = instances[0][1]
            facts = SeriesFacts(header, len(instances), tenant_id, called_ae_title="")
            files = tuple(path for path, _ in instances)
            study_uid = str(header.get("StudyInstanceUID") or "")
            routed.append(RoutedSeries(study_uid, series_uid, files, tuple(match_routes(facts, self.routes))))
        return routed
