"""``ResultsService``: results reopened, their files, and radiologists' reviews of them, apart from HTTP.

Every call names the tenant: another tenant's result is not found (404), as an unknown or expired one. The API's
router calls it once the gatekeeper has let the request in (``serve_app.api.results``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

from serve_app.errors import ResultNotFound
from serve_app.model_spec import ModelRef
from serve_app.observability import metrics
from serve_app.results.fhir import fhir_report
from serve_app.results.measurements import LabelVolume
from serve_app.results.reviews import Review, ReviewRequest, ReviewStore
from serve_app.results.store import ResultStore
from serve_app.results.summary import ResultSummary
from serve_app.results.worklist import Worklist, WorklistQuery, build_worklist

__all__ = ["ResultFile", "ResultsService"]

# The files of a result: the study's image (when kept), the mask, and a DICOM study's SEG and SR.
ResultFile = Literal["image", "mask", "seg", "sr"]


class ResultsService:
    """The results of one application.

    Args:
        results: the results on shared storage; their reviews are kept with them.
    """

    def __init__(self, results: ResultStore):
        self.results = results
        self.reviews = ReviewStore(results)
        self._paths = {
            "image": results.image_path,
            "mask": results.mask_path,
            "seg": results.seg_path,
            "sr": results.sr_path,
        }

    async def summary(self, result_id: str, tenant_id: str, result_path: str) -> ResultSummary:
        """The result reopened: its labels and volumes, model and reviews, its files located under
        ``result_path``."""
        return await asyncio.to_thread(self._summary, result_id, tenant_id, result_path)

    async def file(self, result_id: str, tenant_id: str, name: ResultFile) -> Path:
        """One file of the result. A first download builds it (the whole mask gzipped; the SEG and SR): seconds
        of CPU, off the event loop. 404 for an image not kept, or a SEG or SR of a NIfTI study."""
        return await asyncio.to_thread(self._paths[name], result_id, tenant_id)

    async def fhir(self, result_id: str, tenant_id: str) -> dict:
        """The result as a FHIR R4 Bundle (its DiagnosticReport, one Observation per label volume), as JSON."""
        return await asyncio.to_thread(self._fhir, result_id, tenant_id)

    def require(self, result_id: str, tenant_id: str) -> None:
        """``ResultNotFound`` (404) unless the tenant has this unexpired result."""
        self.results.folder_of(result_id, tenant_id)

    async def review(self, result_id: str, tenant_id: str, order: ReviewRequest) -> Review:
        """Store a review with the result, counted by the result's model, version and verdict."""
        review = await asyncio.to_thread(self.reviews.add, result_id, tenant_id, order)
        metrics.count_review(review.model, review.model_version, review.verdict, tenant_id)
        return review

    async def reviews_of_result(self, result_id: str, tenant_id: str) -> list[Review]:
        """The result's reviews, oldest first."""
        return await asyncio.to_thread(self.reviews.of_result, result_id, tenant_id)

    async def reviews_of_tenant(self, tenant_id: str, model: str | None, version: str | None) -> list[Review]:
        """The tenant's reviews of its unexpired results, of one model (and version) when given, oldest first."""
        return await asyncio.to_thread(self.reviews.of_tenant, tenant_id, model, version)

    async def worklist(self, tenant_id: str, query: WorklistQuery) -> Worklist:
        """A page of the tenant's review worklist, newest first (``build_worklist``: bounded file reads)."""
        return await asyncio.to_thread(build_worklist, self.results, self.reviews, tenant_id, query)

    def _fhir(self, result_id: str, tenant_id: str) -> dict:
        spec = self.results.model_of(result_id, tenant_id)
        if spec is None:  # stored by a medserve that kept no model with its results: no codes to report
            raise ResultNotFound("this result was stored without its model: it has no FHIR report")
        volumes = [LabelVolume.model_validate(v) for v in self.results.summary(result_id, tenant_id)["labels"]]
        made = self.results.made(result_id, tenant_id)
        study = self.results.study_instance_uid(result_id, tenant_id)
        return json.loads(fhir_report(result_id, spec, volumes, made, study).model_dump_json())

    def _summary(self, result_id: str, tenant_id: str, result_path: str) -> ResultSummary:
        spec = self.results.model_of(result_id, tenant_id)
        return ResultSummary(
            result_id=result_id,
            **self.results.summary(result_id, tenant_id),
            model=ModelRef(name=spec.name, version=spec.version) if spec else None,
            mask_url=f"{result_path}/mask.nii.gz",
            image_url=f"{result_path}/image" if self.results.has_image(result_id, tenant_id) else None,
            reviews=self.reviews.of_result(result_id, tenant_id),
        )
