"""Ingress: the HTTP API. Spools uploads to disk, drives preprocess -> model -> postprocess, serves results.

No `from __future__ import annotations` here: FastAPI must see real types on a Serve class ingress.
"""


import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from serve_app.observability import metrics
from serve_app.config import AppConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge, RequestError
from serve_app.model_repository import ModelRepository
from serve_app.results import ResultStore
from serve_app.segmentation.stage_handles import StageHandles
from serve_app.tenancy.gatekeeper import Gatekeeper, Visit
from serve_app.studies.volume import spacing_of

logger = logging.getLogger("ray.serve")
api = FastAPI(title="medserve", description="Segmentation of CT/MR studies on a Ray Serve cluster.")
_CHUNK = 1 << 20
metrics.instrument(api)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(RayTaskError)
async def _stage_error(request: Request, exc: RayTaskError) -> JSONResponse:
    # A stage raised: Ray hands back a wrapper whose ``cause`` is the original exception.
    if isinstance(exc.cause, RequestError):
        return _error_response(exc.cause)
    logger.error("a stage failed: %s", type(exc.cause).__name__)
    return JSONResponse({"error": {"status": 500, "reason": "internal error in a processing stage"}}, status_code=500)


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": exc.status_code, "reason": exc.reason}}, status_code=exc.status_code, headers=exc.headers
    )


def _ms(**seconds: float) -> dict[str, float]:
    return {k: round(v * 1000, 1) for k, v in seconds.items()}


# Serve serialises the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class IngressDeployment:
    def __init__(
        self,
        config: AppConfig,
        models: dict[str, DeploymentHandle],
        preprocess: Optional[DeploymentHandle] = None,
        postprocess: Optional[DeploymentHandle] = None,
        gate: Optional[DeploymentHandle] = None,
    ):
        self.config = config
        self.repository = ModelRepository(config.model_repository)
        self.results = ResultStore.of(config.storage)
        self.stages = StageHandles(models, preprocess, postprocess)
        self.gatekeeper = Gatekeeper(config, self.repository, gate)
        config.storage.uploads.mkdir(parents=True, exist_ok=True)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.stages.ready(), timeout=5)
        except Exception:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(self.stages.models)})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        async with self.gatekeeper.visit(request, "models"):
            return {"models": [spec.summary() for spec in self.repository]}

    @api.get("/v1/models/{name}")
    async def describe_model(self, name: str, request: Request) -> dict:
        async with self.gatekeeper.visit(request, "models", model=name):
            return self.repository.get(name).summary()

    @api.post("/v1/models/{name}/segment")
    async def segment(self, name: str, request: Request, stat: bool = False) -> dict:
        async with self.gatekeeper.visit(request, "segment", model=name, stat=stat, admit=True) as visit:
            return await self._segment(name, request, visit)

    async def _segment(self, name: str, request: Request, visit: Visit) -> dict:
        start = time.perf_counter()
        spec = self.repository.get(name)
        request_id = visit.request_id
        folder = self.config.storage.uploads / request_id
        folder.mkdir(parents=True)
        try:
            uploaded_bytes = await self._spool(request, folder, visit.max_upload_bytes)
            spooled = time.perf_counter()
            await visit.wait_for_slot()
            segmentation = await self.stages.segment(name, folder, request_id)
            visit.study_instance_uid = segmentation.study_instance_uid
            self.results.set_owner(request_id, visit.tenant_id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        affine = segmentation.grid.affine
        summary = {
            "result_id": request_id,
            "model": {"name": spec.name, "version": spec.version},
            "labels": segmentation.labels,
            "shape": list(segmentation.grid.shape),
            "spacing": [round(s, 6) for s in spacing_of(affine)],
            "orientation": "".join(nib.aff2axcodes(affine)),
            "affine": np.asarray(affine).round(6).tolist(),
            # root_path: the application's route prefix, when it is not served at /.
            "mask_url": f"{request.scope.get('root_path', '')}/v1/results/{request_id}/mask.nii.gz",
            "batch_size": segmentation.batch_size,
            "uploaded_bytes": uploaded_bytes,
            "timings_ms": _ms(upload=spooled - start, **segmentation.timings_s, total=time.perf_counter() - start),
        }
        visit.timings_ms = {**summary["timings_ms"], **_ms(queue=visit.slot_wait_s)}
        metrics.observe_segment(request, name, summary["timings_ms"])
        return summary

    @api.get("/v1/results/{result_id}")
    async def result_summary(self, result_id: str, request: Request) -> dict:
        async with self.gatekeeper.visit(request, "result", result_id=result_id) as visit:
            return {"result_id": result_id, **self.results.summary(result_id, visit.tenant_id)}

    @api.get("/v1/results/{result_id}/mask.nii.gz")
    async def result_mask(self, result_id: str, request: Request) -> FileResponse:
        async with self.gatekeeper.visit(request, "mask", result_id=result_id) as visit:
            # The first download builds and gzips the whole mask: seconds of CPU, off the event loop.
            path = await asyncio.to_thread(self.results.mask_path, result_id, visit.tenant_id)
        return FileResponse(path, media_type="application/gzip", filename="mask.nii.gz")

    async def _spool(self, request: Request, folder: Path, limit: int) -> int:
        """Stream the body to files in ``folder`` without holding it in memory; return its size."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the upload is {declared} bytes, over this server's limit of {limit}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            total = 0
            async with request.form(max_files=self.config.limits.max_files_per_upload) as form:
                parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                if not parts:
                    raise InvalidStudy("the multipart upload has no file parts")
                for n, part in enumerate(parts):
                    with open(folder / f"{n:06d}", "wb") as out:
                        while chunk := await part.read(_CHUNK):
                            total += len(chunk)
                            if total > limit:
                                raise PayloadTooLarge(f"the upload is over this server's limit of {limit} bytes")
                            out.write(chunk)
            return total
        total = 0
        with open(folder / "000000", "wb") as out:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"the upload is over this server's limit of {limit} bytes")
                out.write(chunk)
        if total == 0:
            raise InvalidStudy("the request body is empty; send a zip, DICOM files or a NIfTI image")
        return total
