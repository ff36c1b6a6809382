"""``SegmentationProcessor``: a routed series through the same segmentation pipeline as an HTTP request.

The node calls its processor from a worker thread; the segmentation service is asynchronous and runs on the
replica's event loop, so each call is handed to that loop and waited for. Each series is a request like any other:
the gatekeeper counts it against its tenant's quotas (the tenant of the AE title it was sent to) and writes its
audit line (route ``dicom``; the stages' seconds are observed in the same latency histogram as an HTTP request's,
with the route label ``dicom``), the stages' deployments run the route's model (the version it names, else the
newest), and the result is kept in the result store, where ``GET /v1/results/{id}`` finds it. Its DICOM SEG and SR
are built there and handed to the outbox.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from serve_app.dicom_network.outbox import SeriesResult
from serve_app.dicom_network.routing import Route
from serve_app.dicom_network.series import CompletedSeries
from serve_app.errors import ReplicaLost, ServiceBusy, TooManyRequests
from serve_app.observability import metrics
from serve_app.results import ResultStore
from serve_app.segmentation.responses import SegmentResponse
from serve_app.segmentation.service import SegmentationService
from serve_app.studies.upload import UploadBudget
from serve_app.tenancy.gatekeeper import Gatekeeper

__all__ = ["SegmentationProcessor", "copied_series", "series_result"]

_ROUTE = "dicom"  # the route of a series that came by C-STORE: its audit line's, its latency metrics' label
# A series over its tenant's rate, or finding the stages busy, waits as told and tries again, this many times at most.
_TRIES = 20
_RETRY_LATER = (TooManyRequests, ServiceBusy, ReplicaLost)


def copied_series(files: tuple[Path, ...]) -> Callable[[Path, UploadBudget], Awaitable[int]]:
    """A segmentation's ``Receive`` that copies a series' files from the inbox into the request's upload folder,
    within its budget (the tenant's upload limit holds for a series sent by C-STORE as for one uploaded)."""

    async def receive(folder: Path, budget: UploadBudget) -> int:
        def copy() -> int:
            budget.spend_files(len(files))
            for number, path in enumerate(files):
                budget.spend_bytes(path.stat().st_size)
                shutil.copyfile(path, folder / f"{number:05d}.dcm")
            return budget.bytes

        return await asyncio.to_thread(copy)

    return receive


class SegmentationProcessor:
    """The ``SeriesProcessor`` of a DICOM node deployment.

    Args:
        segmentation: the application's segmentation service, over the stages' deployment handles.
        gatekeeper: its gatekeeper (quotas, audit).
        results: its result store, where the SEG and SR of a result are built.
        loop: the event loop the service runs on (the replica's).
    """

    def __init__(
        self,
        segmentation: SegmentationService,
        gatekeeper: Gatekeeper,
        results: ResultStore,
        loop: asyncio.AbstractEventLoop,
    ):
        self.segmentation, self.gatekeeper, self.results, self.loop = segmentation, gatekeeper, results, loop

    def __call__(self, series: CompletedSeries, route: Route) -> SeriesResult:
        """Called from a node's worker thread: waits for the series to be processed on the event loop."""
        return asyncio.run_coroutine_threadsafe(self.process(series, route), self.loop).result()

    async def process(self, series: CompletedSeries, route: Route) -> SeriesResult:
        """The series segmented by ``route``'s model; over its tenant's rate, or with the stages busy, it waits as
        told (Retry-After) and tries again. Raises what a segment request raises (``RequestError``s, their reasons
        recorded by the node)."""
        tries = 1
        while True:
            try:
                return await self._segment(series, route)
            except _RETRY_LATER as refusal:
                if tries == _TRIES:
                    raise
                tries += 1
                await asyncio.sleep(float(refusal.args[1]))  # its retry_after_s

    async def _segment(self, series: CompletedSeries, route: Route) -> SeriesResult:
        record = series.record
        visit_of = self.gatekeeper.visit(
            None, _ROUTE, model=route.model, version=route.model_version, admit=True, tenant_id=record.tenant
        )
        async with visit_of as visit:
            path = f"/v1/results/{visit.request_id}"
            answer = await self.segmentation.segment(visit, route.model, copied_series(series.files), path)
        metrics.observe_stages(_ROUTE, route.model, record.tenant, answer.timings_ms.model_dump())
        return await series_result(
            self.results, answer, record.tenant, record.study_instance_uid, record.series_instance_uid
        )


async def series_result(
    results: ResultStore, answer: SegmentResponse, tenant: str, study_instance_uid: str, series_instance_uid: str
) -> SeriesResult:
    """A series' segmentation (``answer``, the tenant's) as the outbox takes it: the model as run, and the result's
    DICOM SEG and SR, built in ``results`` (off the event loop) on first asking."""
    seg = await asyncio.to_thread(results.seg_path, answer.result_id, tenant)
    sr = await asyncio.to_thread(results.sr_path, answer.result_id, tenant)
    return SeriesResult(
        tenant=tenant,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        model=answer.model.name,
        model_version=answer.model.version,
        result_id=answer.result_id,
        files=(seg, sr),
    )
