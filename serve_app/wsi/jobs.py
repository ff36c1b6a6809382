"""WsiJobs: the API's side of WSI jobs. Submit (check slides and quotas, write the record, start the
driver), report, cancel, list, serve result files, and take slide uploads.

The API's router calls it once the gatekeeper has authenticated the tenant (``serve_app.api.wsi``); every route is a
few lines there.
A job runs in its own detached Ray actor (``serve_app.wsi.job_driver.WsiJobDriver``), named after the job,
so any ingress replica finds it, and it keeps running whichever replica took the request.

A tenant's jobs read slides from its own roots (``tenants.<id>.wsi_slide_roots``; on an open server
``wsi.slide_roots``) and its own uploads, never another tenant's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import ray
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.errors import (
    BadRequest,
    Conflict,
    ModelTaskMismatch,
    PayloadTooLarge,
    RequestError,
    ResultNotFound,
    TooManyRequests,
)
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelSpec
from serve_app.storage import private_folder
from serve_app.wsi.job_driver import DRIVER_NAMESPACE, WsiJobDriver, driver_name
from serve_app.wsi.job_status import (
    JobRecords,
    JobState,
    SlideState,
    SlideStatus,
    SlideUpload,
    WsiJobRequest,
    WsiJobStatus,
    utc_now,
)
from serve_app.wsi.slide_paths import SlidePolicy

__all__ = ["SLIDE_OUTPUTS", "WsiJobs"]

# The files of a slide's folder the API serves, and their media types. The Zarr heatmap is a folder: it is
# read where it lies, on the shared storage (its path is in the job's out_path).
SLIDE_OUTPUTS = {
    "overlay.png": "image/png",
    "tissue.png": "image/png",
    "tiles.geojson": "application/geo+json",
    "summary.json": "application/json",
}
_SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"}
_RETRY_AFTER_S = 60.0
# Held while a submit checks the tenant's running jobs and records its own: two submits into one `out` (or past the
# running-job limit) at once are serialised, whichever ingress replica takes them (on NFS, Linux makes flock an NFS
# lock, which holds across nodes).
_SUBMIT_LOCK = ".submit.lock"


class WsiJobs:
    """WSI jobs of one application.

    Args:
        config: the application's config; ``wsi`` above all.
        repository: the models, to check that a job names a tile classifier.
    """

    def __init__(self, config: AppConfig, repository: ModelRepository, tile_model_handles: dict[str, DeploymentHandle]):
        self.config, self.wsi, self.repository = config, config.wsi, repository
        self.tile_model_handles = tile_model_handles
        private_folder(config.wsi.output_root)
        self.records = JobRecords(config.wsi.jobs)

    def submit(self, request: WsiJobRequest, job_id: str, tenant_id: str) -> WsiJobStatus:
        """Check, record and start job ``job_id``; 403 / 400 only if every slide is refused (else each refused
        slide fails alone), 409 if a running job writes the same ``out``, 429 over the running-job limit."""
        spec = self.repository.get(request.model)
        if spec.task != "tile_classification":
            raise ModelTaskMismatch(
                f"model {spec.name} is a {spec.task} model; WSI jobs need a tile_classification one"
            )
        with _submitting(self.wsi.tenant_folder(tenant_id)):
            return self._submit(request, spec, job_id, tenant_id)

    def _submit(self, request: WsiJobRequest, spec: ModelSpec, job_id: str, tenant_id: str) -> WsiJobStatus:
        active = [job for job in self.records.of_tenant(tenant_id) if self._refresh(job).state.active]
        limit = self.wsi.max_running_jobs_per_tenant
        if len(active) >= limit:
            raise TooManyRequests(
                f"tenant {tenant_id} has {len(active)} WSI jobs running; the limit is {limit}", _RETRY_AFTER_S
            )
        out = request.out or job_id
        if any(job.out == out for job in active):
            raise Conflict(f"a running job of this tenant writes into out {out!r}; wait for it or cancel it")
        policy = SlidePolicy(self._slide_roots(tenant_id), self.wsi.uploads(tenant_id))
        slides, paths, refusals = [], [], []
        for raw in request.slides:
            try:
                path = policy.resolve(raw)
            except RequestError as e:
                slides.append(SlideStatus(slide=raw, key=_slide_key(raw), state=SlideState.failed, error=e.reason))
                paths.append(None)
                refusals.append(e)
                continue
            slides.append(SlideStatus(slide=raw, key=_slide_key(str(path))))
            paths.append(str(path))
        if len(refusals) == len(request.slides):
            raise refusals[0]
        out_path = self.wsi.tenant_folder(tenant_id) / out
        status = WsiJobStatus(
            job_id=job_id,
            tenant=tenant_id,
            model=spec.name,
            model_version=spec.version,
            out=out,
            out_path=str(out_path),
            mpp=request.mpp,
            created=utc_now(),
            slides=slides,
        )
        out_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        driver = WsiJobDriver.options(name=driver_name(job_id), namespace=DRIVER_NAMESPACE, lifetime="detached").remote(
            self.config, status, paths, self.tile_model_handles[spec.key]
        )
        # Saved once the driver's name is registered (so the record is never seen without its driver) and
        # before it runs (so this first record never overwrites the driver's own).
        self.records.save(status)
        driver.run.remote()  # the actor runs the job to its end, then exits; its record says how it went
        return status

    def status(self, job_id: str, tenant_id: str) -> WsiJobStatus:
        return self._refresh(self.records.load(job_id, tenant_id))

    def of_tenant(self, tenant_id: str) -> list[WsiJobStatus]:
        return [self._refresh(job) for job in self.records.of_tenant(tenant_id)]

    async def cancel(self, job_id: str, tenant_id: str) -> WsiJobStatus:
        """Stop sending work; what is finished stays, and the same ``out`` resumes it later."""
        status = self.status(job_id, tenant_id)
        if not status.state.active:
            return status
        driver = _driver(job_id)
        if driver is not None:
            await driver.cancel.remote()
            return status
        status.state, status.finished = JobState.cancelled, utc_now()
        self.records.save(status)
        return status

    def output(self, job_id: str, tenant_id: str, slide_index: int, name: str) -> Path:
        """A result file of one slide of the tenant's job; 404 if unknown or not written yet."""
        status = self.status(job_id, tenant_id)
        if name not in SLIDE_OUTPUTS:
            raise ResultNotFound(f"no output {name!r}; a slide has {', '.join(SLIDE_OUTPUTS)}")
        if not 0 <= slide_index < len(status.slides):
            raise ResultNotFound(f"job {job_id} has slides 0 to {len(status.slides) - 1}")
        path = Path(status.out_path) / status.slides[slide_index].key / name
        if not path.is_file():
            raise ResultNotFound(f"slide {slide_index} of job {job_id} has no {name} (yet)")
        return path

    async def upload(
        self, chunks: AsyncIterator[bytes], declared_bytes: int | None, tenant_id: str, name: str
    ) -> SlideUpload:
        """Stream a slide, ``chunks`` as they arrive (``declared_bytes`` in all, when the request says), into the
        tenant's upload folder, at most ``wsi.max_upload_bytes``, and within the tenant's ``wsi_upload_quota_bytes``
        with what it keeps uploaded already (413 past either); ``name`` gives its suffix."""
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in _SLIDE_SUFFIXES:
            raise BadRequest(f"a slide's name must end in one of {', '.join(sorted(_SLIDE_SUFFIXES))}")
        folder = self.wsi.uploads(tenant_id)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        limit = self.wsi.max_upload_bytes
        too_large = PayloadTooLarge(f"the slide is over this server's limit of {limit} bytes (wsi.max_upload_bytes)")
        tenant = self.config.tenants.get(tenant_id)
        quota = tenant.wsi_upload_quota_bytes if tenant else None
        # Uploads in progress count as far as they got, so concurrent ones mostly see one another.
        kept = sum(_size(path) for path in folder.iterdir()) if quota is not None else 0
        if quota is not None and quota - kept < limit:
            limit = max(quota - kept, 0)
            too_large = PayloadTooLarge(
                f"the slide would take tenant {tenant_id}'s uploads past its quota of {quota} bytes "
                f"(wsi_upload_quota_bytes; {kept} bytes are kept): wait for older uploads to expire "
                "(wsi.retention_days) or ask for a larger quota"
            )
        if declared_bytes is not None and declared_bytes > limit:
            raise too_large
        target = folder / f"{uuid.uuid4().hex}{suffix}"
        partial = target.with_name(f".{target.name}.partial")
        received = 0
        try:
            with open(partial, "wb") as file:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > limit:
                        raise too_large
                    file.write(chunk)
            if received == 0:
                raise BadRequest("the upload is empty")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return SlideUpload(slide=str(target), bytes=received)

    def _slide_roots(self, tenant_id: str) -> list[Path]:
        """The folders the tenant's slides may come from, besides its uploads: its own with tenants configured, the
        server's on an open server."""
        if self.config.tenants:
            return self.config.tenants[tenant_id].wsi_slide_roots
        return self.wsi.slide_roots

    def _refresh(self, status: WsiJobStatus) -> WsiJobStatus:
        """A record that says active while its driver is gone was interrupted (the driver or its node died)."""
        if status.state.active and _driver(status.job_id) is None:
            status.state = JobState.interrupted
        return status


@contextmanager
def _submitting(tenant_folder: Path) -> Iterator[None]:
    """Hold the tenant's submit lock (an exclusive ``flock``) for the block."""
    tenant_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(tenant_folder / _SUBMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, also if this process dies
        yield
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a partial upload that was just renamed, or swept
        return 0


def _driver(job_id: str):
    try:
        return ray.get_actor(driver_name(job_id), namespace=DRIVER_NAMESPACE)
    except ValueError:
        return None


def _slide_key(path: str) -> str:
    """A slide's folder in the job's output folder: its name, and a hash of its path (names may repeat)."""
    stem = PurePosixPath(path).stem or "slide"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:64]
    return f"{safe}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
