"""The whole-slide-image routes: jobs submitted, reported, listed, cancelled, their files served, and slides
uploaded. The work is ``WsiJobs``'s."""

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from serve_app.api.dependencies import GatekeeperDep, WsiJobsDep, declared_length, json_body
from serve_app.responses import ERROR_RESPONSES
from serve_app.wsi.job_status import SlideUpload, WsiJobList, WsiJobRequest, WsiJobStatus
from serve_app.wsi.jobs import SLIDE_OUTPUTS

__all__ = ["router"]

router = APIRouter()

# What the job route's body is, for /docs: it is read (``json_body``) once the request is authenticated, not by
# FastAPI before the route runs.
_WSI_JOB_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": WsiJobRequest.model_json_schema()}}}
}


@router.post(
    "/v1/wsi/jobs",
    response_model=WsiJobStatus,
    status_code=202,
    responses=ERROR_RESPONSES,
    openapi_extra=_WSI_JOB_BODY,
)
async def submit_wsi_job(request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep) -> WsiJobStatus:
    """Start a job (``WsiJobRequest``): slides on shared storage, or DICOM WSI series on a configured PACS, through a
    tile classifier (docs/wsi.md)."""
    job_id = uuid.uuid4().hex
    async with gatekeeper.visit(request, "wsi-submit", result_id=job_id) as visit:
        job = await json_body(request, WsiJobRequest)
        gatekeeper.authorise_model(visit, job.model)
        status = await asyncio.to_thread(wsi_jobs.submit, job, job_id, visit.tenant_id)
        gatekeeper.routed(visit, status.model_version)  # the version that runs it: a rollout's, not the newest
        return status


@router.get("/v1/wsi/jobs", response_model=WsiJobList, responses=ERROR_RESPONSES)
async def list_wsi_jobs(request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep) -> WsiJobList:
    async with gatekeeper.visit(request, "wsi-list") as visit:
        return WsiJobList(jobs=await asyncio.to_thread(wsi_jobs.of_tenant, visit.tenant_id))


@router.get("/v1/wsi/jobs/{job_id}", response_model=WsiJobStatus, responses=ERROR_RESPONSES)
async def wsi_job(job_id: str, request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep) -> WsiJobStatus:
    async with gatekeeper.visit(request, "wsi-status", result_id=job_id) as visit:
        return await asyncio.to_thread(wsi_jobs.status, job_id, visit.tenant_id)


@router.delete("/v1/wsi/jobs/{job_id}", response_model=WsiJobStatus, responses=ERROR_RESPONSES)
async def cancel_wsi_job(
    job_id: str, request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep
) -> WsiJobStatus:
    """Stop a job: units in flight finish and are kept; submitting again with the same out resumes it."""
    async with gatekeeper.visit(request, "wsi-cancel", result_id=job_id) as visit:
        return await wsi_jobs.cancel(job_id, visit.tenant_id)


@router.get(
    "/v1/wsi/jobs/{job_id}/slides/{slide_index}/{output}",
    response_class=FileResponse,
    responses={
        200: {"content": {media: {} for media in set(SLIDE_OUTPUTS.values())}, "description": "The file."},
        **ERROR_RESPONSES,
    },
)
async def wsi_output(
    job_id: str, slide_index: int, output: str, request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep
) -> FileResponse:
    """One slide's overlay.png, tissue.png, tiles.geojson and regions.geojson (QuPath), summary.json,
    annotations.dcm (DICOM Microscopy Bulk Simple Annotations, for a slide read from DICOM WSI) or probabilities.dcm
    (the heatmap as a DICOM Parametric Map)."""
    async with gatekeeper.visit(request, "wsi-output", result_id=job_id) as visit:
        path = await asyncio.to_thread(wsi_jobs.output, job_id, visit.tenant_id, slide_index, output)
    return FileResponse(path, media_type=SLIDE_OUTPUTS[output], filename=output)


@router.post("/v1/wsi/slides", response_model=SlideUpload, status_code=201, responses=ERROR_RESPONSES)
async def upload_slide(name: str, request: Request, gatekeeper: GatekeeperDep, wsi_jobs: WsiJobsDep) -> SlideUpload:
    """Store a slide (the request's body, streamed) for the tenant's jobs; ``name`` gives its suffix."""
    async with gatekeeper.visit(request, "wsi-upload") as visit:
        return await wsi_jobs.upload(request.stream(), declared_length(request), visit.tenant_id, name)
