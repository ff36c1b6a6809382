"""``SegmentationService``: one 3D segmentation request, apart from HTTP.

A study reaches the request's upload folder (whatever the caller's ``Receive`` does: an upload spooled, a series
retrieved from a PACS, a STOW-RS body), waits for a processing slot, goes through the stages within the request's
deadline and is kept as a result; the answer says what it measured and where its files are. The API's routers call
it once the gatekeeper has let the request in (``serve_app.api.segmentation``, ``serve_app.api.dicomweb``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.config import AppConfig
from serve_app.errors import DeadlineExceeded, ModelTaskMismatch, status_of
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelRef, ModelSpec
from serve_app.results import ResultStore
from serve_app.results.agreement import agreement_of
from serve_app.segmentation.messages import Segmentation
from serve_app.segmentation.responses import NIFTI_ONLY_NOTE, SegmentResponse, SegmentTimings
from serve_app.segmentation.rollouts import Rollout, Rollouts, study_identity
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
# Beside a request's upload folder: the copy of its study a shadow run of a rollout's candidate reads.
_SHADOW_SUFFIX = ".shadow"
logger = logging.getLogger("ray.serve")


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
        self.rollouts = Rollouts(config, repository, gatekeeper.audit)
        self.shadow_deadline_s = config.limits.request_deadline_s
        self._detached: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references

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

        A model with a rollout (``rollouts.<model>``), asked for without a version, answers with the version the
        rollout gives the study (live, or the candidate for a canary study), and with a shadow rollout the
        candidate also runs on a copy of the study once the answer is ready, never delaying it
        (``docs/rollouts.md``).

        Raises ``ModelTaskMismatch`` (422) for a model that is not a segmentation model, ``DeadlineExceeded``
        (504) past the visit's deadline (its work cancelled), and whatever ``receive`` and the stages raise.
        """
        spec = self.repository.get(model, visit.model_version)
        if spec.task != "segmentation":
            raise ModelTaskMismatch(f"model {model} is a {spec.task} model: send its slides as a WSI job")
        rollout = None if visit.version_named else self.rollouts.of(spec.name)
        if rollout is None:
            return await self._segment(visit, spec, receive, result_path, keep_image, None)
        routed = _Routed(spec=rollout.live, role="live")
        try:
            answer = await self._segment(visit, spec, receive, result_path, keep_image, (rollout, routed))
        except BaseException as error:  # a client that hung up too: its shadow's copy and slot are given back
            if routed.role == "canary" and status_of(error) >= 500 and status_of(error) != 503:
                failed = {"role": "canary", "version": routed.spec.version, "outcome": "error"}
                self._detach(asyncio.to_thread(rollout.record, failed))
            if routed.shadow_folder is not None:
                rollout.release_shadow_slot()
                shutil.rmtree(routed.shadow_folder, ignore_errors=True)
            raise
        record = {"role": routed.role, "version": routed.spec.version, "outcome": "ok", "result_id": answer.result_id}
        if routed.role == "live":
            rollout.record(record, answer.timings_ms.total / 1000)  # an append: no threshold to judge
        else:  # a candidate's run, judged against the abort thresholds: not on the answer's way
            self._detach(asyncio.to_thread(rollout.record, record, answer.timings_ms.total / 1000))
        if routed.shadow_folder is not None:
            self._detach(self._shadow(rollout, routed.shadow_folder, answer.result_id, visit.tenant_id))
        return answer

    async def _segment(
        self,
        visit: Visit,
        spec: ModelSpec,
        receive: Receive,
        result_path: str,
        keep_image: bool,
        rolling: tuple[Rollout, _Routed] | None,
    ) -> SegmentResponse:
        """``segment``'s work; with ``rolling``, the study's version and role are the rollout's, set in the
        ``_Routed`` as soon as they are known (with the copy of the study a shadow run reads)."""
        watch = Stopwatch()
        folder = self.uploads / visit.request_id
        folder.mkdir(parents=True)
        marker = None
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
                    if rolling is not None:
                        spec, marker = await self._route(visit, folder, *rolling)
                    await self.gatekeeper.wait_for_slot(visit)
                    image = folder / _KEPT_IMAGE if keep_image else None
                    segmentation = await self.stages.segment(spec, folder, visit.request_id, image)
            await asyncio.to_thread(self.results.commit, visit.request_id, visit.tenant_id, image, marker)
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

    async def _route(self, visit: Visit, folder: Path, rollout: Rollout, routed: _Routed) -> tuple[ModelSpec, dict]:
        """The version the rollout gives the study in ``folder``, and the result's rollout marker; a study it
        shadows is copied (hard links) for the candidate before the live stages can unpack anything into it."""
        identity = await asyncio.to_thread(study_identity, folder) if rollout.needs_identity else None
        routed.spec, routed.role = rollout.route(identity)
        self.gatekeeper.routed(visit, routed.spec.version)
        if routed.role == "live" and rollout.shadows(identity) and rollout.take_shadow_slot():
            shadow_folder = folder.with_name(folder.name + _SHADOW_SUFFIX)
            try:
                await asyncio.to_thread(shutil.copytree, folder, shadow_folder, copy_function=os.link)
            except BaseException:
                rollout.release_shadow_slot()
                shutil.rmtree(shadow_folder, ignore_errors=True)
                raise
            routed.shadow_folder = shadow_folder
        return routed.spec, {"role": routed.role, "version": routed.spec.version, "paired_result_id": None}

    def _detach(self, work: Awaitable) -> None:
        """``work`` (a shadow run, a candidate's record) in a task of its own: the answer goes now. An empty
        context: Serve takes a call made in a request's context for the request's child, and cancels it with the
        request."""

        async def run():
            try:
                await work
            except Exception as error:  # the storage, say: logged by class, as the answer went already
                logger.warning("a rollout's work after an answer failed: %s", type(error).__name__)

        task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _shadow(self, rollout: Rollout, folder: Path, live_id: str, tenant_id: str) -> None:
        """The candidate on a copy of a study the live version answered: its result kept for review (marked a
        shadow, paired with the live one, never sent to a PACS), its agreement with the live result recorded."""
        shadow_id, watch = uuid.uuid4().hex, Stopwatch()
        version = rollout.candidate.version
        try:
            with self.results.discarded_if_cancelled(shadow_id):
                async with asyncio.timeout(self.shadow_deadline_s):
                    await self.stages.segment(rollout.candidate, folder, shadow_id)
            marker = {"role": "shadow", "version": version, "paired_result_id": live_id}
            await asyncio.to_thread(self.results.commit, shadow_id, tenant_id, None, marker)
            agreement = await asyncio.to_thread(agreement_of, self.results, live_id, shadow_id, tenant_id)
        except Exception as error:
            logger.warning("a shadow run of %s %s failed: %s", rollout.model, version, type(error).__name__)
            run = {"role": "shadow", "version": version, "outcome": "error", "live_result_id": live_id}
            await asyncio.to_thread(rollout.record, run)
        else:
            run = {
                "role": "shadow",
                "version": version,
                "outcome": "ok",
                "result_id": shadow_id,
                "live_result_id": live_id,
                **agreement.model_dump(),
            }
            await asyncio.to_thread(rollout.record, run, watch.total_s)
        finally:
            rollout.release_shadow_slot()
            shutil.rmtree(folder, ignore_errors=True)


class _Routed:
    """Where a rollout sent one study: the version that answers it, its role, and the copy a shadow run reads."""

    def __init__(self, spec: ModelSpec, role: str):
        self.spec, self.role = spec, role
        self.shadow_folder: Path | None = None


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
