"""The segmentation routes: a study sent in the request's body (a zip, DICOM or NIfTI files, multipart files) or a
series a configured PACS holds (a JSON body), segmented by a model. The work is ``SegmentationService``'s, and for
a PACS's series also ``DicomwebService``'s."""

from functools import partial

from fastapi import APIRouter, Request

from serve_app.api.dependencies import DicomwebDep, GatekeeperDep, SegmentationDep, json_body, media_type, result_path
from serve_app.dicomweb.messages import PacsSegmentRequest
from serve_app.dicomweb.service import DicomwebService
from serve_app.observability import metrics
from serve_app.responses import ERROR_RESPONSES
from serve_app.segmentation.responses import SegmentResponse
from serve_app.segmentation.service import Receive, SegmentationService
from serve_app.studies.upload import spool_request
from serve_app.tenancy.gatekeeper import Gatekeeper, Visit

__all__ = ["router", "segmented"]

router = APIRouter()

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


@router.post(
    "/v1/models/{name}/segment",
    response_model=SegmentResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_SEGMENT_BODIES,
)
async def segment(
    name: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationDep,
    dicomweb: DicomwebDep,
    stat: bool = False,
    keep_image: bool = False,
) -> SegmentResponse:
    """Segment one study with the model's newest version: a zip, one DICOM or NIfTI file, or multipart files;
    or, with a JSON body (``PacsSegmentRequest``), a series a configured PACS holds (see the README). With
    ``keep_image``, the study's image on the mask's grid is kept with the result (``GET
    /v1/results/{id}/image``, for a viewer)."""
    return await _segment_request(request, name, None, stat, keep_image, gatekeeper, segmentation, dicomweb)


@router.post(
    "/v1/models/{name}/versions/{version}/segment",
    response_model=SegmentResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_SEGMENT_BODIES,
)
async def segment_with_version(
    name: str,
    version: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationDep,
    dicomweb: DicomwebDep,
    stat: bool = False,
    keep_image: bool = False,
) -> SegmentResponse:
    """Segment one study with one version of the model (``GET /v1/models/{name}`` lists them); the body and
    options as for ``/v1/models/{name}/segment``."""
    return await _segment_request(request, name, version, stat, keep_image, gatekeeper, segmentation, dicomweb)


async def _segment_request(
    request: Request,
    name: str,
    version: str | None,
    stat: bool,
    keep_image: bool,
    gatekeeper: Gatekeeper,
    segmentation: SegmentationService,
    dicomweb: DicomwebService,
) -> SegmentResponse:
    visiting = gatekeeper.visit(request, "segment", model=name, version=version, stat=stat, admit=True)
    async with visiting as visit:
        if media_type(request) != "application/json":
            return await segmented(request, segmentation, visit, name, partial(spool_request, request), keep_image)
        order = await json_body(request, PacsSegmentRequest)
        pacs = dicomweb.pacs_of(order.pacs, visit.tenant_id)
        answer = await segmented(request, segmentation, visit, name, dicomweb.retrieval(pacs, order), keep_image)
        if dicomweb.stores_back(pacs, order):
            answer.pacs_store = await dicomweb.store_back(pacs, answer, visit.tenant_id)
        return answer


async def segmented(
    request: Request,
    segmentation: SegmentationService,
    visit: Visit,
    model: str,
    receive: Receive,
    keep_image: bool = False,
) -> SegmentResponse:
    """The request's study, as ``receive`` brings it, segmented by ``model``; its stages' seconds observed in the
    latency metrics."""
    answer = await segmentation.segment(visit, model, receive, result_path(request, visit.request_id), keep_image)
    metrics.observe_segment(request, model, answer.timings_ms.model_dump())
    return answer
