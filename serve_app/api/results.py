"""The results' routes: a result reopened, its files, its reviews, and its DICOM SEG and SR stored to a PACS. The
work is ``ResultsService``'s (and ``DicomwebService``'s for a store)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError

from serve_app.api.dependencies import DicomwebDep, GatekeeperDep, ResultsDep, json_body, result_path
from serve_app.dicomweb.messages import StoreRequest
from serve_app.errors import BadRequest
from serve_app.responses import ERROR_RESPONSES
from serve_app.results.reviews import Review, ReviewList, ReviewRequest, reviews_csv
from serve_app.results.service import ResultFile, ResultsService
from serve_app.results.summary import ResultSummary
from serve_app.results.worklist import DEFAULT_PAGE, MAX_PAGE, Worklist, WorklistQuery, WorklistState
from serve_app.segmentation.responses import PacsStoreOutcome
from serve_app.tenancy.gatekeeper import Gatekeeper

__all__ = ["router"]

router = APIRouter()

FHIR_JSON = "application/fhir+json"
_QUERY = WorklistQuery.model_fields


def _file_responses(media_type: str, description: str) -> dict:
    return {200: {"content": {media_type: {}}, "description": description}, **ERROR_RESPONSES}


@router.get("/v1/results/{result_id}", response_model=ResultSummary, responses=ERROR_RESPONSES)
async def result_summary(
    result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep
) -> ResultSummary:
    """A result reopened: its labels and volumes, model, files and reviews."""
    async with gatekeeper.visit(request, "result", result_id=result_id) as visit:
        return await results.summary(result_id, visit.tenant_id, result_path(request, result_id))


@router.get(
    "/v1/results/{result_id}/image",
    response_class=FileResponse,
    responses=_file_responses("application/gzip", "The study's image, gzipped NIfTI."),
)
async def result_image(
    result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep
) -> FileResponse:
    """The study's image on the mask's grid (same shape and affine), kept when the segment request asked
    (``keep_image=true``); 404 saying so when it did not."""
    return await _result_file(request, result_id, "image", "application/gzip", gatekeeper, results)


@router.post(
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
async def review_result(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep) -> Review:
    """Accept or reject a result, or comment on it (``ReviewRequest``); stored with the result, audited (the
    verdict, never the reviewer or comment) and counted by model, version and verdict."""
    async with gatekeeper.visit(request, "review", result_id=result_id) as visit:
        results.require(result_id, visit.tenant_id)  # 404 before reading a body for no result
        order = await json_body(request, ReviewRequest)
        review = await results.review(result_id, visit.tenant_id, order)
        gatekeeper.reviewed(visit, review.model, review.model_version, review.verdict)
        return review


@router.get("/v1/results/{result_id}/reviews", response_model=ReviewList, responses=ERROR_RESPONSES)
async def result_reviews(
    result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep
) -> ReviewList:
    async with gatekeeper.visit(request, "reviews", result_id=result_id) as visit:
        return ReviewList(reviews=await results.reviews_of_result(result_id, visit.tenant_id))


@router.get(
    "/v1/reviews",
    response_model=ReviewList,
    responses={200: {"content": {"text/csv": {}}, "description": "With format=csv."}, **ERROR_RESPONSES},
)
async def list_reviews(
    request: Request,
    gatekeeper: GatekeeperDep,
    results: ResultsDep,
    model: str | None = None,
    version: str | None = None,
    format: Literal["json", "csv"] = "json",
):
    """The tenant's reviews of its unexpired results, of one model (and version) when given, oldest first;
    ``format=csv`` for a spreadsheet."""
    async with gatekeeper.visit(request, "reviews") as visit:
        reviews = await results.reviews_of_tenant(visit.tenant_id, model, version)
    if format == "csv":
        headers = {"Content-Disposition": 'attachment; filename="reviews.csv"'}
        return Response(reviews_csv(reviews), media_type="text/csv; charset=utf-8", headers=headers)
    return ReviewList(reviews=reviews)


@router.get("/v1/reviews/worklist", response_model=Worklist, responses=ERROR_RESPONSES)
async def review_worklist(
    request: Request,
    gatekeeper: GatekeeperDep,
    results: ResultsDep,
    model: Annotated[str | None, Query(max_length=200, description=_QUERY["model"].description)] = None,
    version: Annotated[str | None, Query(max_length=100, description=_QUERY["version"].description)] = None,
    state: Annotated[WorklistState, Query(description=_QUERY["state"].description)] = "awaiting",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=_QUERY["limit"].description)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(description=_QUERY["cursor"].description)] = None,
) -> Worklist:
    """The tenant's results to review, newest first, a page at a time: each live result with the shadow candidates'
    results of the same study beside it. Filtered by model, version and state (``awaiting``, the default: no review
    yet); ``next_cursor`` continues. A page looks at a bounded number of results, so it may be short with a
    ``next_cursor``."""
    async with gatekeeper.visit(request, "worklist") as visit:
        unknown = set(request.query_params) - set(WorklistQuery.model_fields)
        if unknown:
            raise BadRequest(f"unknown query parameter; the worklist takes {', '.join(WorklistQuery.model_fields)}")
        try:
            query = WorklistQuery(model=model, version=version, state=state, limit=limit, cursor=cursor)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise BadRequest(f"invalid worklist query ({problems})") from None
        return await results.worklist(visit.tenant_id, query)


@router.get(
    "/v1/results/{result_id}/mask.nii.gz",
    response_class=FileResponse,
    responses=_file_responses("application/gzip", "The mask, gzipped NIfTI."),
)
async def result_mask(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep) -> FileResponse:
    return await _result_file(request, result_id, "mask", "application/gzip", gatekeeper, results)


@router.get(
    "/v1/results/{result_id}/seg.dcm",
    response_class=FileResponse,
    responses=_file_responses("application/dicom", "The mask as a DICOM Segmentation."),
)
async def result_seg(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep) -> FileResponse:
    """The result as a DICOM Segmentation on its source series' frames (DICOM studies only)."""
    return await _result_file(request, result_id, "seg", "application/dicom", gatekeeper, results)


@router.get(
    "/v1/results/{result_id}/sr.dcm",
    response_class=FileResponse,
    responses=_file_responses("application/dicom", "Each label's volume, a TID 1500 report."),
)
async def result_sr(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep) -> FileResponse:
    """Each label's volume as a DICOM Structured Report (TID 1500) referencing the SEG (DICOM studies only)."""
    return await _result_file(request, result_id, "sr", "application/dicom", gatekeeper, results)


@router.get(
    "/v1/results/{result_id}/fhir",
    response_class=JSONResponse,
    responses={200: {"content": {FHIR_JSON: {}}, "description": "A FHIR R4 Bundle."}, **ERROR_RESPONSES},
)
async def result_fhir(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep) -> JSONResponse:
    """The result as FHIR R4, for an EHR's integration engine: a Bundle (collection) of a DiagnosticReport
    (preliminary) and one Observation per label volume, referencing the imaging study by its StudyInstanceUID."""
    async with gatekeeper.visit(request, "fhir", result_id=result_id) as visit:
        return JSONResponse(await results.fhir(result_id, visit.tenant_id), media_type=FHIR_JSON)


@router.post("/v1/results/{result_id}/store", response_model=PacsStoreOutcome, responses=ERROR_RESPONSES)
async def store_result(
    result_id: str, request: Request, gatekeeper: GatekeeperDep, dicomweb: DicomwebDep
) -> PacsStoreOutcome:
    """Store a result's DICOM SEG and SR to a configured PACS (``StoreRequest``), e.g. after a failed store-back."""
    async with gatekeeper.visit(request, "store", result_id=result_id) as visit:
        order = await json_body(request, StoreRequest)
        pacs = dicomweb.pacs_of(order.pacs, visit.tenant_id)
        return await dicomweb.store_results(pacs, result_id, visit.tenant_id)


async def _result_file(
    request: Request,
    result_id: str,
    name: ResultFile,
    media_type: str,
    gatekeeper: Gatekeeper,
    results: ResultsService,
) -> FileResponse:
    """One file of the result, its download audited as the route ``name``."""
    async with gatekeeper.visit(request, name, result_id=result_id) as visit:
        path = await results.file(result_id, visit.tenant_id, name)
    return FileResponse(path, media_type=media_type, filename=path.name)
