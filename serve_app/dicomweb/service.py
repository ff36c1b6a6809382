"""``DicomwebService``: medserve beside the configured PACS, apart from HTTP.

A series a PACS holds is retrieved (WADO-RS) into a segmentation's upload folder (``retrieval``, a segmentation's
``Receive``); a result's DICOM SEG and SR are stored to a PACS (STOW-RS), after its segmentation (``store_back``) or
when asked (``store_results``). A request names a PACS by its configured name only, never an address
(``pacs_of``). The API's routers call it once the gatekeeper has let the request in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from serve_app.config import AppConfig
from serve_app.dicomweb.messages import PacsSegmentRequest
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.errors import Forbidden, InvalidRequestBody, PacsFailed
from serve_app.results import ResultStore
from serve_app.segmentation.responses import NIFTI_ONLY_NOTE, PacsStoreOutcome, SegmentResponse
from serve_app.studies.upload import UploadBudget

__all__ = ["DicomwebService"]


class DicomwebService:
    """The PACS of one application's ``pacs`` config section.

    Args:
        config: the application's config: ``pacs``.
        results: the results whose DICOM SEG and SR are stored to a PACS.
    """

    def __init__(self, config: AppConfig, results: ResultStore):
        self.pacs = {name: PacsClient(name, pacs) for name, pacs in config.pacs.items()}
        self.results = results

    def pacs_of(self, name: str, tenant_id: str) -> PacsClient:
        """The configured PACS a request names: 422 for one this server does not have, 403 for another tenant's."""
        pacs = self.pacs.get(name)
        if pacs is None:
            configured = ", ".join(sorted(self.pacs)) or "none"
            raise InvalidRequestBody(f"the request names a PACS this server does not have (configured: {configured})")
        if not pacs.config.allows(tenant_id):
            raise Forbidden(f"tenant {tenant_id} may not use PACS {name}")
        return pacs

    @staticmethod
    def retrieval(pacs: PacsClient, order: PacsSegmentRequest) -> Callable[[Path, UploadBudget], Awaitable[int]]:
        """The series ``order`` names, retrieved from ``pacs`` into a segmentation's upload folder within its
        budget: a segmentation's ``Receive``."""

        async def retrieve(folder: Path, budget: UploadBudget) -> int:
            study, series = order.study_instance_uid, order.series_instance_uid
            await asyncio.to_thread(pacs.retrieve_series, study, series, folder, budget)
            return budget.bytes

        return retrieve

    @staticmethod
    def stores_back(pacs: PacsClient, order: PacsSegmentRequest) -> bool:
        """Whether a segmentation of a series of ``pacs`` stores its results back there: as ``order`` asks, else as
        the PACS's ``store_results`` setting says."""
        return order.store_results or (order.store_results is None and pacs.config.store_results)

    async def store_back(self, pacs: PacsClient, answer: SegmentResponse, tenant_id: str) -> PacsStoreOutcome:
        """The SEG and SR of the segmentation ``answer`` stored to ``pacs``; a failure is the outcome's, not the
        request's: the result is made and stays downloadable."""
        if not answer.seg_url:
            return PacsStoreOutcome(pacs=pacs.name, stored=False, attempts=0, reason=NIFTI_ONLY_NOTE)
        try:
            return await self.store_results(pacs, answer.result_id, tenant_id)
        except PacsFailed as failure:
            return PacsStoreOutcome(pacs=pacs.name, stored=False, attempts=0, reason=failure.reason)

    async def store_results(self, pacs: PacsClient, result_id: str, tenant_id: str) -> PacsStoreOutcome:
        """The tenant's result's SEG and SR stored to ``pacs``; raises ``PacsFailed`` (502, 503) when it will not
        take them."""
        instances = await asyncio.to_thread(self.results.dicom_results, result_id, tenant_id)
        attempts = await asyncio.to_thread(pacs.store, instances)
        uids = [str(instance.SOPInstanceUID) for instance in instances]
        return PacsStoreOutcome(pacs=pacs.name, stored=True, attempts=attempts, sop_instance_uids=uids)
