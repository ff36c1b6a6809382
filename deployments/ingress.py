"""IngressDeployment: the HTTP API. Spools uploads to disk, drives preprocess -> model -> postprocess, serves results.

No `from __future__ import annotations` here: FastAPI must see real types on a Serve class ingress.
"""

import asyncio
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette import types as asgi
from starlette.exceptions import HTTPException

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.dicomweb.messages import PacsSegmentRequest, PacsStoreOutcome, StoreRequest
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.dicomweb.stow import DICOM_JSON, spool_stow_request, stow_answer, stowed_instances
from serve_app.drain import DrainGate, DrainWatch
from serve_app.errors import (
    SHUTDOWN_RETRY_S,
    BadRequest,
    DeadlineExceeded,
    Forbidden,
    InvalidRequestBody,
    MethodNotAllowed,
    ModelTaskMismatch,
    PacsFailed,
    PayloadTooLarge,
    RequestError,
    RouteNotFound,
    ShuttingDown,
    status_of,
    unwrap,
)
from serve_app.http_security import SECURITY_HEADERS, HostAllowList, SecurityHeaders
from serve_app.model_repository import ModelRepository
from serve_app.observability import metrics
from serve_app.responses import (
    ERROR_RESPONSES,
    NIFTI_ONLY_NOTE,
    ErrorDetail,
    ErrorResponse,
    Health,
    ModelList,
    ModelRef,
    ModelSummary,
    Readiness,
    ResultSummary,
    SegmentResponse,
    SegmentTimings,
)
from serve_app.results import ResultStore
from serve_app.results.reviews import Review, ReviewList, ReviewRequest, ReviewStore, reviews_csv
from serve_app.retention import RetentionSweeper
from serve_app.segmentation.stage_handles import StageHandles
from serve_app.stopwatch import Stopwatch
from serve_app.studies.upload import UploadBudget, spool_request
from serve_app.studies.volume import spacing_of
from serve_app.tenancy.gatekeeper import Gatekeeper, Visit
from serve_app.viewer import DOCS_ASSETS_PATH, DOCS_PATH, VIEWER_PATH, docs_assets, docs_page, viewer_files
from serve_app.wsi.job_status import SlideUpload, WsiJobList, WsiJobRequest, WsiJobStatus
from serve_app.wsi.jobs import SLIDE_OUTPUTS, WsiJobs

logger = logging.getLogger("ray.serve")
# A JSON body names a series or a PACS: a few hundred bytes. Anything near this is not one.
_MAX_JSON_BODY = 64 * 1024
# How a segmentation's study reaches the upload folder: (folder, budget) -> bytes received.
Receive = Callable[[Path, UploadBudget], Awaitable[int]]
# Sent to a preprocessing stage asked to keep the study's image: it writes it here, in the upload folder.
_KEPT_IMAGE = "kept-image.nii.gz"
# /docs is served from vendored Swagger UI files (below), not FastAPI's page, which loads them from a CDN and runs an
# inline script the Content-Security-Policy refuses; no ReDoc.
api = FastAPI(
    title="medserve",
    description="Segmentation of CT/MR studies on a Ray Serve cluster.",
    docs_url=None,
    redoc_url=None,
)
# The browser viewer's page and scripts, and /docs's: static, no key needed to load them (the pages ask for one).
api.mount(VIEWER_PATH, viewer_files(), name="viewer")
api.mount(DOCS_ASSETS_PATH, docs_assets(), name="docs-assets")


def _error_response(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(status=status, reason=reason))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _refusal(error: RequestError) -> JSONResponse:
    """The answer to a request a middleware refuses before any route runs."""
    return _error_response(error.status_code, error.reason, error.headers)


def _shutting_down() -> JSONResponse:
    return _refusal(ShuttingDown("medserve is shutting down; retry shortly", SHUTDOWN_RETRY_S))


_DISCONNECT_OPT_OUT = b"x-request-disconnect-disabled"


class RefuseDisconnectOptOut:
    """ASGI middleware of the ingress: a request that asks Serve not to watch for its client going away
    (``x-request-disconnect-disabled: ?1``) is answered 400 before any of its body is read.

    Serve honours that header from any client, and then hands the request code its HTTP server's own receive, which
    works only on the server's event loop. The ingress's code runs on a second thread's loop (Serve's default), where
    an upload too large to arrive at once hung, holding its place.
    """

    def __init__(self, app: asgi.ASGIApp):
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "http" and (_DISCONNECT_OPT_OUT, b"?1") in map(tuple, scope["headers"]):
            error = BadRequest("the x-request-disconnect-disabled header is not accepted; send the request without it")
            await _refusal(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# Outermost last. While medserve down drains the application, a new POST is refused and what is in flight is counted
# until it is done. A request for a host the application does not answer for is refused before anything else reads
# it. The response counter counts every refusal; the web headers go on every answer, refusals included.
api.add_middleware(DrainGate, refusal=_shutting_down)
api.add_middleware(RefuseDisconnectOptOut)
api.add_middleware(HostAllowList, refusal=_refusal)
metrics.instrument(api)
api.add_middleware(SecurityHeaders, cacheable=(f"{VIEWER_PATH}/", f"{DOCS_ASSETS_PATH}/"))


# Every error leaves in one format, {"error": {"status", "reason"}}, whoever raised it: medserve, a stage
# behind a handle (wrapped by Ray), or FastAPI and Starlette themselves (unknown routes, bad query values).
# Exception's handler runs outermost, for what nothing else answers (Starlette re-raises it, to be logged).
@api.exception_handler(RequestError)
@api.exception_handler(RayTaskError)
@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    error = unwrap(exc)
    if isinstance(error, RequestError):
        return _error_response(error.status_code, error.reason, error.headers)
    logger.error("request failed: %s", type(error).__name__)  # the class only: a message may quote what was sent
    # Starlette answers an error no other handler takes outside every middleware: the web headers go on here.
    return _error_response(status_of(error), "internal error in a processing stage", SECURITY_HEADERS)


@api.exception_handler(HTTPException)
async def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return await _any_error(request, RouteNotFound("no such route; see /docs for the API"))
    if exc.status_code == 405:
        return await _any_error(request, MethodNotAllowed(f"method {request.method} is not allowed on this route"))
    return _error_response(exc.status_code, str(exc.detail), exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    # pydantic's messages name the parameter and the expected type, never the value sent.
    problems = "; ".join(f"{' '.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return await _any_error(request, BadRequest(f"invalid request parameters ({problems})"))


def _result_path(request: Request, result_id: str) -> str:
    # root_path: the application's route prefix, when it is not served at /.
    return f"{request.scope.get('root_path', '')}/v1/results/{result_id}"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body as ``model``; 422 naming each field that does not fit (never its value)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BODY:
            raise PayloadTooLarge(f"a JSON body is at most {_MAX_JSON_BODY} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidRequestBody(f"the JSON body is invalid ({problems})") from None


# What a segment route's body may be, for /docs.
_SEGMENT_BODIES = {
    "requestBody": {
        "content": {
            "application/json": {"schema": PacsSegmentRequest.model_json_schema()},
            "application/zip": {},
            "application/octet-stream": {},
            "multipart/form-data": {},
        }
    }
}


# What the WSI job route's body is, for /docs: it is read (``_json_body``) once the request is authenticated, not by
# FastAPI before the route runs.
_WSI_JOB_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": WsiJobRequest.model_json_schema()}}}
}


# Serve serialises the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class IngressDeployment(Replica):
    def __init__(
        self,
        config: AppConfig,
        repository: ModelRepository,
        model_handles: dict[str, DeploymentHandle],
        tile_model_handles: dict[str, DeploymentHandle],
        preprocess: DeploymentHandle | None = None,
        postprocess: DeploymentHandle | None = None,
        gate: DeploymentHandle | None = None,
    ):
        self.config = config
        self.repository = repository  # as the application was built from it: the models it has deployments for
        self.results = ResultStore.of(config.storage)
        self.reviews = ReviewStore(self.results)
        self.stages = StageHandles(model_handles, preprocess, postprocess)
        self.gatekeeper = Gatekeeper(config, self.repository, gate)
        self.wsi_jobs = WsiJobs(config, self.repository, tile_model_handles)
        self.pacs = {name: PacsClient(name, pacs) for name, pacs in config.pacs.items()}
        # Expired results and WSI files deleted on a timer, whether requests come or not (every replica sweeps).
        self.sweeper = RetentionSweeper(config).start()
        api.state.drain = DrainWatch(config, serve.get_replica_context().replica_id.unique_id)
        api.state.allowed_hosts = config.http.host_allow_list()

    @api.get(DOCS_PATH, include_in_schema=False)
    async def docs(self) -> FileResponse:
        """Swagger UI on /openapi.json, from the vendored files under /docs/assets."""
        return docs_page()

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(self):
        try:
            await asyncio.wait_for(self.stages.ready(), timeout=5)
        except Exception:
            return JSONResponse(Readiness(status="not ready").model_dump(), status_code=503)
        return Readiness(status="ready", models=list(self.stages.model_handles))

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, request: Request) -> ModelList:
        async with self.gatekeeper.visit(request, "models"):
            models = [ModelSummary.of(self.repository.versions(name)) for name in self.repository.names()]
            return ModelList(models=models, refused=self.repository.refused)

    @api.get("/v1/models/{name}", response_model=ModelSummary, responses=ERROR_RESPONSES)
    async def describe_model(self, name: str, request: Request) -> ModelSummary:
        async with self.gatekeeper.visit(request, "models", model=name):
            return ModelSummary.of(self.repository.versions(name))

    @api.post(
        "/v1/models/{name}/segment",
        response_model=SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_SEGMENT_BODIES,
    )
    async def segment(
        self, name: str, request: Request, stat: bool = False, keep_image: bool = False
    ) -> SegmentResponse:
        """Segment one study with the model's newest version: a zip, one DICOM or NIfTI file, or multipart files;
        or, with a JSON body (``PacsSegmentRequest``), a series a configured PACS holds (see the README). With
        ``keep_image``, the study's image on the mask's grid is kept with the result (``GET
        /v1/results/{id}/image``, for a viewer)."""
        return await self._segment_request(name, None, request, stat, keep_image)

    @api.post(
        "/v1/models/{name}/versions/{version}/segment",
        response_model=SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_SEGMENT_BODIES,
    )
    async def segment_with_version(
        self, name: str, version: str, request: Request, stat: bool = False, keep_image: bool = False
    ) -> SegmentResponse:
        """Segment one study with one version of the model (``GET /v1/models/{name}`` lists them); the body and
        options as for ``/v1/models/{name}/segment``."""
        return await self._segment_request(name, version, request, stat, keep_image)

    async def _segment_request(
        self, name: str, version: str | None, request: Request, stat: bool, keep_image: bool
    ) -> SegmentResponse:
        visiting = self.gatekeeper.visit(request, "segment", model=name, version=version, stat=stat, admit=True)
        async with visiting as visit:
            if _media_type(request) == "application/json":
                return await self._segment_from_pacs(name, request, visit, keep_image)
            return await self._segment(name, request, visit, partial(spool_request, request), keep_image)

    async def _segment_from_pacs(self, name: str, request: Request, visit: Visit, keep_image: bool) -> SegmentResponse:
        order = await _json_body(request, PacsSegmentRequest)
        pacs = self._pacs_of(order.pacs, visit)

        async def retrieve(folder: Path, budget: UploadBudget) -> int:
            study, series = order.study_instance_uid, order.series_instance_uid
            await asyncio.to_thread(pacs.retrieve_series, study, series, folder, budget)
            return budget.bytes

        answer = await self._segment(name, request, visit, retrieve, keep_image)
        if order.store_results or (order.store_results is None and pacs.config.store_results):
            answer.pacs_store = await self._store_back(pacs, answer, visit)
        return answer

    async def _segment(
        self, name: str, request: Request, visit: Visit, receive: Receive, keep_image: bool = False
    ) -> SegmentResponse:
        """The study ``receive`` writes to the request's upload folder, segmented by model ``name`` (the version the
        visit names); with ``keep_image``, its image kept with the result."""
        watch = Stopwatch()
        spec = self.repository.get(name, visit.model_version)
        if spec.task != "segmentation":
            raise ModelTaskMismatch(f"model {name} is a {spec.task} model: send its slides as a WSI job")
        folder = self.config.storage.uploads / visit.request_id
        folder.mkdir(parents=True)
        try:
            # Cancelling the awaited handle calls cancels the request in the replicas running it (Serve passes
            # the cancellation on), so no stage keeps working for an answer nobody will read. What a stage runs in
            # a thread cannot be interrupted: the result it may still store is discarded.
            deadline = asyncio.timeout(visit.seconds_left())
            with self.results.discarded_if_cancelled(visit.request_id):
                async with deadline:
                    budget = UploadBudget(
                        max_bytes=visit.max_upload_bytes, max_files=self.config.limits.max_files_per_upload
                    )
                    uploaded_bytes = await receive(folder, budget)
                    upload_s = watch.lap()
                    await visit.wait_for_slot()
                    image = folder / _KEPT_IMAGE if keep_image else None
                    segmentation = await self.stages.segment(spec, folder, visit.request_id, image)
            await asyncio.to_thread(self.results.commit, visit.request_id, visit.tenant_id, image)
            visit.study_instance_uid = segmentation.study_instance_uid
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of something else inside: not the request's deadline
            raise DeadlineExceeded(
                f"the request took longer than its deadline of {visit.deadline_s:g} s; its work was cancelled"
            ) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        timings = SegmentTimings.of(upload_s, segmentation.timings, watch.total_s)
        visit.timings_ms = {**timings.model_dump(), "queue": round(visit.slot_wait_s * 1000, 1)}
        metrics.observe_segment(request, name, timings)
        affine = segmentation.grid.affine
        result_path = _result_path(request, visit.request_id)
        dicom = segmentation.dicom_source
        return SegmentResponse(
            result_id=visit.request_id,
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

    @api.post(
        "/dicomweb/{model}/studies",
        response_class=JSONResponse,
        responses={
            200: {"content": {DICOM_JSON: {}}, "description": "The STOW-RS answer; RetrieveURL: the result."},
            **ERROR_RESPONSES,
        },
    )
    async def stow(self, model: str, request: Request) -> JSONResponse:
        """STOW-RS: a PACS pushes one series (``multipart/related; type="application/dicom"``) to be segmented
        by ``model``; the answer lists the instances, and its RetrieveURL (and Location) is the result."""
        return await self._stow(model, request, store_to=None)

    @api.post(
        "/dicomweb/{model}/store-to/{pacs}/studies",
        response_class=JSONResponse,
        responses={
            200: {"content": {DICOM_JSON: {}}, "description": "The STOW-RS answer; RetrieveURL: the result."},
            **ERROR_RESPONSES,
        },
    )
    async def stow_and_store_back(self, model: str, pacs: str, request: Request) -> JSONResponse:
        """STOW-RS as ``stow``, then the result's SEG and SR stored to the configured PACS ``pacs``: a PACS that
        pushes a series here gets the results back without anyone asking (a failed store is logged, and the
        result stays downloadable)."""
        return await self._stow(model, request, store_to=pacs)

    async def _stow(self, model: str, request: Request, store_to: str | None) -> JSONResponse:
        async with self.gatekeeper.visit(request, "stow", model=model, admit=True) as visit:
            pacs = None if store_to is None else self._pacs_of(store_to, visit)
            instances = []

            async def receive(folder: Path, budget: UploadBudget) -> int:
                received = await spool_stow_request(request, folder, budget)
                instances.extend(await asyncio.to_thread(stowed_instances, folder))
                return received

            answer = await self._segment(model, request, visit, receive)
            if pacs is not None:
                outcome = await self._store_back(pacs, answer, visit)
                if not outcome.stored:
                    logger.warning("result %s: store-back failed: %s", answer.result_id, outcome.reason)
        result_url = f"{str(request.base_url).rstrip('/')}/v1/results/{answer.result_id}"
        return JSONResponse(stow_answer(instances, result_url), media_type=DICOM_JSON, headers={"Location": result_url})

    async def _store_back(self, pacs: PacsClient, answer: SegmentResponse, visit: Visit) -> PacsStoreOutcome:
        """The result's SEG and SR stored to ``pacs`` after a segmentation; a failure is the outcome's, not the
        request's: the result is made and stays downloadable."""
        if not answer.seg_url:
            return PacsStoreOutcome(pacs=pacs.name, stored=False, attempts=0, reason=NIFTI_ONLY_NOTE)
        try:
            return await self._store_results(pacs, answer.result_id, visit)
        except PacsFailed as failure:
            return PacsStoreOutcome(pacs=pacs.name, stored=False, attempts=0, reason=failure.reason)

    async def _store_results(self, pacs: PacsClient, result_id: str, visit: Visit) -> PacsStoreOutcome:
        instances = await asyncio.to_thread(self.results.dicom_results, result_id, visit.tenant_id)
        attempts = await asyncio.to_thread(pacs.store, instances)
        uids = [str(instance.SOPInstanceUID) for instance in instances]
        return PacsStoreOutcome(pacs=pacs.name, stored=True, attempts=attempts, sop_instance_uids=uids)

    def _pacs_of(self, name: str, visit: Visit) -> PacsClient:
        """The configured PACS a request names: 422 for one this server does not have, 403 for another tenant's."""
        pacs = self.pacs.get(name)
        if pacs is None:
            configured = ", ".join(sorted(self.pacs)) or "none"
            raise InvalidRequestBody(f"the request names a PACS this server does not have (configured: {configured})")
        if not pacs.config.allows(visit.tenant_id):
            raise Forbidden(f"tenant {visit.tenant_id} may not use PACS {name}")
        return pacs

    @api.get("/v1/results/{result_id}", response_model=ResultSummary, responses=ERROR_RESPONSES)
    async def result_summary(self, result_id: str, request: Request) -> ResultSummary:
        """A result reopened: its labels and volumes, model, files and reviews."""
        async with self.gatekeeper.visit(request, "result", result_id=result_id) as visit:
            return await asyncio.to_thread(self._reopened, request, result_id, visit.tenant_id)

    def _reopened(self, request: Request, result_id: str, tenant_id: str) -> ResultSummary:
        spec = self.results.model_of(result_id, tenant_id)
        path = _result_path(request, result_id)
        return ResultSummary(
            result_id=result_id,
            **self.results.summary(result_id, tenant_id),
            model=ModelRef(name=spec.name, version=spec.version) if spec else None,
            mask_url=f"{path}/mask.nii.gz",
            image_url=f"{path}/image" if self.results.has_image(result_id, tenant_id) else None,
            reviews=self.reviews.of_result(result_id, tenant_id),
        )

    @api.get(
        "/v1/results/{result_id}/image",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/gzip": {}}, "description": "The study's image, gzipped NIfTI."},
            **ERROR_RESPONSES,
        },
    )
    async def result_image(self, result_id: str, request: Request) -> FileResponse:
        """The study's image on the mask's grid (same shape and affine), kept when the segment request asked
        (``keep_image=true``); 404 saying so when it did not."""
        return await self._result_file(request, result_id, "image", self.results.image_path, "application/gzip")

    @api.post(
        "/v1/results/{result_id}/reviews",
        response_model=Review,
        status_code=201,
        responses=ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ReviewRequest.model_json_schema()}},
            }
        },
    )
    async def review_result(self, result_id: str, request: Request) -> Review:
        """Accept or reject a result, or comment on it (``ReviewRequest``); stored with the result, audited (the
        verdict, never the reviewer or comment) and counted by model, version and verdict."""
        async with self.gatekeeper.visit(request, "review", result_id=result_id) as visit:
            self.results.folder_of(result_id, visit.tenant_id)  # 404 before reading a body for no result
            order = await _json_body(request, ReviewRequest)
            review = await asyncio.to_thread(self.reviews.add, result_id, visit.tenant_id, order)
            visit.model, visit.model_version, visit.verdict = review.model, review.model_version, review.verdict
            metrics.count_review(review.model, review.model_version, review.verdict, visit.tenant_id)
            return review

    @api.get("/v1/results/{result_id}/reviews", response_model=ReviewList, responses=ERROR_RESPONSES)
    async def result_reviews(self, result_id: str, request: Request) -> ReviewList:
        async with self.gatekeeper.visit(request, "reviews", result_id=result_id) as visit:
            return ReviewList(reviews=await asyncio.to_thread(self.reviews.of_result, result_id, visit.tenant_id))

    @api.get(
        "/v1/reviews",
        response_model=ReviewList,
        responses={200: {"content": {"text/csv": {}}, "description": "With format=csv."}, **ERROR_RESPONSES},
    )
    async def list_reviews(
        self,
        request: Request,
        model: str | None = None,
        version: str | None = None,
        format: Literal["json", "csv"] = "json",
    ):
        """The tenant's reviews of its unexpired results, of one model (and version) when given, oldest first;
        ``format=csv`` for a spreadsheet."""
        async with self.gatekeeper.visit(request, "reviews") as visit:
            reviews = await asyncio.to_thread(self.reviews.of_tenant, visit.tenant_id, model, version)
        if format == "csv":
            headers = {"Content-Disposition": 'attachment; filename="reviews.csv"'}
            return Response(reviews_csv(reviews), media_type="text/csv; charset=utf-8", headers=headers)
        return ReviewList(reviews=reviews)

    @api.get(
        "/v1/results/{result_id}/mask.nii.gz",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/gzip": {}}, "description": "The mask, gzipped NIfTI."},
            **ERROR_RESPONSES,
        },
    )
    async def result_mask(self, result_id: str, request: Request) -> FileResponse:
        return await self._result_file(request, result_id, "mask", self.results.mask_path, "application/gzip")

    @api.get(
        "/v1/results/{result_id}/seg.dcm",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/dicom": {}}, "description": "The mask as a DICOM Segmentation."},
            **ERROR_RESPONSES,
        },
    )
    async def result_seg(self, result_id: str, request: Request) -> FileResponse:
        """The result as a DICOM Segmentation on its source series' frames (DICOM studies only)."""
        return await self._result_file(request, result_id, "seg", self.results.seg_path, "application/dicom")

    @api.get(
        "/v1/results/{result_id}/sr.dcm",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/dicom": {}}, "description": "Each label's volume, a TID 1500 report."},
            **ERROR_RESPONSES,
        },
    )
    async def result_sr(self, result_id: str, request: Request) -> FileResponse:
        """Each label's volume as a DICOM Structured Report (TID 1500) referencing the SEG (DICOM studies only)."""
        return await self._result_file(request, result_id, "sr", self.results.sr_path, "application/dicom")

    async def _result_file(
        self, request: Request, result_id: str, route: str, path_of: Callable[[str, str], Path], media_type: str
    ) -> FileResponse:
        async with self.gatekeeper.visit(request, route, result_id=result_id) as visit:
            # A first download builds the file (the whole mask gzipped; the SEG and SR): seconds of CPU, off the
            # event loop.
            path = await asyncio.to_thread(path_of, result_id, visit.tenant_id)
        return FileResponse(path, media_type=media_type, filename=path.name)

    @api.post("/v1/results/{result_id}/store", response_model=PacsStoreOutcome, responses=ERROR_RESPONSES)
    async def store_result(self, result_id: str, request: Request) -> PacsStoreOutcome:
        """Store a result's DICOM SEG and SR to a configured PACS (``StoreRequest``), e.g. after a failed store-back."""
        async with self.gatekeeper.visit(request, "store", result_id=result_id) as visit:
            order = await _json_body(request, StoreRequest)
            return await self._store_results(self._pacs_of(order.pacs, visit), result_id, visit)

    @api.post(
        "/v1/wsi/jobs",
        response_model=WsiJobStatus,
        status_code=202,
        responses=ERROR_RESPONSES,
        openapi_extra=_WSI_JOB_BODY,
    )
    async def submit_wsi_job(self, request: Request) -> WsiJobStatus:
        """Start a job (``WsiJobRequest``): slides on shared storage through a tile classifier (see the README, WSI
        jobs)."""
        job_id = uuid.uuid4().hex
        async with self.gatekeeper.visit(request, "wsi-submit", result_id=job_id) as visit:
            job = await _json_body(request, WsiJobRequest)
            self.gatekeeper.authorise_model(visit, job.model)
            return await asyncio.to_thread(self.wsi_jobs.submit, job, job_id, visit.tenant_id)

    @api.get("/v1/wsi/jobs", response_model=WsiJobList, responses=ERROR_RESPONSES)
    async def list_wsi_jobs(self, request: Request) -> WsiJobList:
        async with self.gatekeeper.visit(request, "wsi-list") as visit:
            return WsiJobList(jobs=await asyncio.to_thread(self.wsi_jobs.of_tenant, visit.tenant_id))

    @api.get("/v1/wsi/jobs/{job_id}", response_model=WsiJobStatus, responses=ERROR_RESPONSES)
    async def wsi_job(self, job_id: str, request: Request) -> WsiJobStatus:
        async with self.gatekeeper.visit(request, "wsi-status", result_id=job_id) as visit:
            return await asyncio.to_thread(self.wsi_jobs.status, job_id, visit.tenant_id)

    @api.delete("/v1/wsi/jobs/{job_id}", response_model=WsiJobStatus, responses=ERROR_RESPONSES)
    async def cancel_wsi_job(self, job_id: str, request: Request) -> WsiJobStatus:
        """Stop a job: units in flight finish and are kept; submitting again with the same out resumes it."""
        async with self.gatekeeper.visit(request, "wsi-cancel", result_id=job_id) as visit:
            return await self.wsi_jobs.cancel(job_id, visit.tenant_id)

    @api.get(
        "/v1/wsi/jobs/{job_id}/slides/{slide_index}/{output}",
        response_class=FileResponse,
        responses={
            200: {"content": {media: {} for media in set(SLIDE_OUTPUTS.values())}, "description": "The file."},
            **ERROR_RESPONSES,
        },
    )
    async def wsi_output(self, job_id: str, slide_index: int, output: str, request: Request) -> FileResponse:
        """One slide's overlay.png, tissue.png, tiles.geojson (QuPath) or summary.json."""
        async with self.gatekeeper.visit(request, "wsi-output", result_id=job_id) as visit:
            path = await asyncio.to_thread(self.wsi_jobs.output, job_id, visit.tenant_id, slide_index, output)
        return FileResponse(path, media_type=SLIDE_OUTPUTS[output], filename=output)

    @api.post("/v1/wsi/slides", response_model=SlideUpload, status_code=201, responses=ERROR_RESPONSES)
    async def upload_slide(self, name: str, request: Request) -> SlideUpload:
        """Store a slide (the request's body, streamed) for the tenant's jobs; ``name`` gives its suffix."""
        async with self.gatekeeper.visit(request, "wsi-upload") as visit:
            return await self.wsi_jobs.upload(request, visit.tenant_id, name)
