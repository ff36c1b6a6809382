"""``SegmentationService``: one 3D segmentation request, apart from HTTP.

A study reaches the request's upload folder (whatever the caller's ``Receive`` does: an upload spooled, a series
retrieved from a PACS, a STOW-RS body), waits for a processing slot, goes through the stages within the request's
deadline and is kept as a result; the answer says what it measured and where its files are. The API's routers call
it once the gatekeeper has let the request in (``serve_app.api.segmentation``, ``serve_app.api.dicomweb``).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.config import AppConfig
from serve_app.errors import DeadlineExceeded, ModelTaskMismatch
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelRef, ModelSpec
from serve_app.results import ResultStore
from serve_app.segmentation.messages import Segmentation
from serve_app.segmentation.responses import NIFTI_ONLY_NOTE, SegmentResponse, SegmentTimings
from serve_app.segmentation.stage_handles import StageHandles
from serve_app.stopwatch import Stopwatch
from serve_app.studies.upload import UploadBudget
from serve_app.studies.volume import spacing_of
from serve_app.tenancy.gatekeeper import Gatekeeper, Visit

__all__ = ["Receive", "SegmentationService"]

# How a segmentation's study reaches the upload folder: (folder, budget) -> bytes received.
Receive = Callable[[Path, UploadBudget], Awaitable[int]]
# Sent to a preprocessing stage asked to keep the study's image: it writes it here, in the upload folder.
_KEPT_IMAGE = "kept-image.nii.gz"


class SegmentationService:
    """The segmentation models of one application, behind their stages' deployment handles.

    Args:
        config: the application's config: ``storage`` (the upload folders) and ``limits``.
        repository: the models, as the application was built from them.
        stages: the stages' handles, of either layout.
        results: where a finished segmentation is kept.
        gatekeeper: the requests' door: a request waits there for a processing slot, and hands it what its audit
            line tells.
    """

    def __init__(
        self,
        config: AppConfig,
        repository: ModelRepository,
        stages: StageHandles,
        results: ResultStore,
        gatekeeper: Gatekeeper,
    ):
        self.uploads, self.max_files = config.storage.uploads, config.limits.max_files_per_upload
        self.repository, self.stages, self.results, self.gatekeeper = repository, stages, results, gatekeeper

    @property
    def models(self) -> list[str]:
        """The keys of the models served (``ModelSpec.key``)."""
        return list(self.stages.model_handles)

    async def ready(self) -> None:
        """Returns once every stage's deployment answers."""
        await self.stages.ready()

    async def segment(
        self, visit: Visit, model: str, receive: Receive, result_path: str, keep_image: bool = False
    ) -> SegmentResponse:
        """The study ``receive`` writes to the request's upload folder, segmented by ``model`` (the version the
        visit names) and kept as result ``visit.request_id``, whose files the answer locates under
        ``result_path``; with ``keep_image``, the study's image is kept with it.

        Raises ``ModelTaskMismatch`` (422) for a model that is not a segmentation model, ``DeadlineExceeded``
        (504) past the visit's deadline (its work cancelled), and whatever ``receive`` and the stages raise.
        """
        watch = Stopwatch()
        spec = self.repository.get(model, visit.model_version)
        if spec.task != "segmentation":
            raise ModelTaskMismatch(f"model {model} is a {spec.task} model: send its slides as a WSI job")
        folder = self.uploads / visit.request_id
        folder.mkdir(parents=True)
        try:
            # Cancelling the awaited handle calls cancels the request in the replicas running it (Serve passes
            # the cancellation on), so no stage keeps working for an answer nobody will read. What a stage runs in
            # a thread cannot be interrupted: the result it may still store is discarded.
            deadline = asyncio.timeout(visit.seconds_left())
            with self.results.discarded_if_cancelled(visit.request_id):
                async with deadline:
                    budget = UploadBudget(max_bytes=visit.max_upload_bytes, max_files=self.max_files)
                    uploaded_bytes = await receive(folder, budget)
                    upload_s = watch.lap()
                    await self.gatekeeper.wait_for_slot(visit)
                    image = folder / _KEPT_IMAGE if keep_image else None
                    segmentation = await self.stages.segment(spec, folder, visit.request_id, image)
            await asyncio.to_thread(self.results.commit, visit.request_id, visit.tenant_id, image)
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of something else inside: not the request's deadline
            raise DeadlineExceeded(
                f"the request took longer than its deadline of {visit.deadline_s:g} s; its work was cancelled"
            ) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        timings = SegmentTimings.of(upload_s, segmentation.timings, watch.total_s)
        self.gatekeeper.segmented(visit, segmentation.study_instance_uid, timings.model_dump())
        return _answer(visit.request_id, spec, segmentation, result_path, uploaded_bytes, timings)


def _answer(
    result_id: str,
    spec: ModelSpec,
    segmentation: Segmentation,
    result_path: str,
    uploaded_bytes: int,
    timings: SegmentTimings,
) -> SegmentResponse:
    affine = segmentation.grid.affine
    dicom = segmentation.dicom_source
    return SegmentResponse(
        result_id=result_id,
        model=ModelRef(name=spec.name, version=spec.version),
        labels=segmentation.labels,
        shape=list(segmentation.grid.shape),
        spacing=[round(s, 6) for s in spacing_of(affine)],
        orientation="".join(nib.aff2axcodes(affine)),
        affine=np.asarray(affine).round(6).tolist(),
        mask_url=f"{result_path}/mask.nii.gz",
        seg_url=f"{result_path}/seg.dcm" if dicom else None,
        sr_url=f"{result_path}/sr.dcm" if dicom else None,
        notes=[] if dicom else [NIFTI_ONLY_NOTE],
        batch_size=segmentation.batch_size,
        uploaded_bytes=uploaded_bytes,
        timings_ms=timings,
    )
