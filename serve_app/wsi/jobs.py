"""WsiJobs: the API's side of WSI jobs. Submit (check slides and quotas, hand the job to a driver), report, cancel,
list, serve result files, and take slide uploads.

The API's router calls it once the gatekeeper has authenticated the tenant (``serve_app.api.wsi``); every route is a
few lines there.
A job runs on one of a pool of long-lived, detached Ray actors (``serve_app.wsi.job_driver.WsiJobDriver``,
``wsi.job_drivers`` of them), started with the application and named, so any ingress replica finds the job's driver
(it asks each which jobs it runs), and the job keeps running whichever replica took the request. A record that says
running while no driver runs its job was interrupted: its driver's process died (Ray restarts the driver, knowing
none of its jobs), and the job resumes when submitted again into the same ``out``.

A model with a rollout (``rollouts.<model>``, a shadow) runs a job's slides through the version the rollout gives
(the live one, or the candidate once promoted), and its driver shadows them with the candidate (docs/rollouts.md).

A tenant's jobs read slides from its own roots (``tenants.<id>.wsi_slide_roots``; on an open server
``wsi.slide_roots``) and its own uploads, never another tenant's.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig, PacsConfig
from serve_app.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidRequestBody,
    ModelTaskMismatch,
    PayloadTooLarge,
    RequestError,
    ResultNotFound,
    TooManyRequests,
)
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelSpec
from serve_app.segmentation.rollouts import Rollouts
from serve_app.storage import private_folder
from serve_app.wsi.job_driver import (
    ANNOTATIONS_FILE,
    DRIVER_NAMESPACE,
    DRIVER_PREFIX,
    PROBABILITY_MAP_FILE,
    REGIONS_FILE,
    WsiJobDriver,
    code_version,
    driver_names,
)
from serve_app.wsi.job_status import (
    DicomwebSlideRef,
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
from serve_app.wsi.slides import DicomwebSlide
from serve_app.wsi.work_units import SlideSource

__all__ = ["SLIDE_OUTPUTS", "WsiJobs", "driver_of"]

# The files of a slide's folder the API serves, and their media types. The Zarr heatmap is a folder: it is
# read where it lies, on the shared storage (its path is in the job's out_path).
SLIDE_OUTPUTS = {
    "overlay.png": "image/png",
    "tissue.png": "image/png",
    "tiles.geojson": "application/geo+json",
    REGIONS_FILE: "application/geo+json",
    "summary.json": "application/json",
    ANNOTATIONS_FILE: "application/dicom",
    PROBABILITY_MAP_FILE: "application/dicom",
}
_SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"}
_RETRY_AFTER_S = 60.0
# Held while a submit checks the tenant's running jobs and records its own: two submits into one `out` (or past the
# running-job limit) at once are serialised, whichever ingress replica takes them (on NFS, Linux makes flock an NFS
# lock, which holds across nodes).
_SUBMIT_LOCK = ".submit.lock"
# How long a driver may take to say which jobs it runs, or to take one: long enough for Ray to restart one whose
# process died (a restarted driver answers that it runs none of its old jobs: they were interrupted).
_DRIVER_ANSWER_S = 60.0


class WsiJobs:
    """WSI jobs of one application.

    Args:
        config: the application's config; ``wsi`` above all.
        repository: the models, to check that a job names a tile classifier.
        tile_model_handles: each tile classifier version's ``TileModelDeployment``, by its spec's key.
        rollouts: the application's rollouts (the ingress replica's, shared with segmentation); None: none.
    """

    def __init__(
        self,
        config: AppConfig,
        repository: ModelRepository,
        tile_model_handles: dict[str, DeploymentHandle],
        rollouts: Rollouts | None = None,
    ):
        self.config, self.wsi, self.repository = config, config.wsi, repository
        self.tile_model_handles = tile_model_handles
        self.rollouts = rollouts
        private_folder(config.wsi.output_root)
        self.records = JobRecords(config.wsi.jobs)
        if ray.is_initialized():  # in a Serve replica: the pool is up before the first job comes
            self._drivers()
            _retire_other_pools()

    def submit(self, request: WsiJobRequest, job_id: str, tenant_id: str) -> WsiJobStatus:
        """Check, record and start job ``job_id``; 403 / 400 only if every slide is refused (else each refused
        slide fails alone), 409 if a running job writes the same ``out``, 429 over the running-job limit."""
        spec = self.repository.get(request.model)
        if spec.task != "tile_classification":
            raise ModelTaskMismatch(
                f"model {spec.name} is a {spec.task} model; WSI jobs need a tile_classification one"
            )
        rollout = self.rollouts.of(spec.name) if self.rollouts is not None else None
        if rollout is not None:  # the live version, or the candidate once promoted (a tile model's is a shadow)
            spec = rollout.route(None)[0]
        with _submitting(self.wsi.tenant_folder(tenant_id)):
            return self._submit(request, spec, job_id, tenant_id)

    def _submit(self, request: WsiJobRequest, spec: ModelSpec, job_id: str, tenant_id: str) -> WsiJobStatus:
        active = [job for job in self._refreshed(self.records.of_tenant(tenant_id)) if job.state.active]
        limit = self.wsi.max_running_jobs_per_tenant
        if len(active) >= limit:
            raise TooManyRequests(
                f"tenant {tenant_id} has {len(active)} WSI jobs running; the limit is {limit}", _RETRY_AFTER_S
            )
        out = request.out or job_id
        if any(job.out == out for job in active):
            raise Conflict(f"a running job of this tenant writes into out {out!r}; wait for it or cancel it")
        if request.store_to is not None:
            self._pacs(request.store_to, tenant_id)  # refused now, not after the night's slides
        policy = SlidePolicy(self._slide_roots(tenant_id), self.wsi.uploads(tenant_id))
        slides: list[SlideStatus] = []
        sources: list[SlideSource | None] = []
        refusals: list[RequestError] = []
        for raw in request.slides:
            try:
                source = self._source(raw, policy, tenant_id)
            except RequestError as e:
                slides.append(SlideStatus(slide=raw, key=_slide_key(raw), state=SlideState.failed, error=e.reason))
                sources.append(None)
                refusals.append(e)
                continue
            slides.append(SlideStatus(slide=raw, key=_slide_key(source)))
            sources.append(source)
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
            store_to=request.store_to,
            created=utc_now(),
            slides=slides,
        )
        out_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        rollout = self.rollouts.of(spec.name) if self.rollouts is not None else None
        candidate = self.tile_model_handles[rollout.candidate.key] if rollout is not None else None
        # The driver saves the job's first record before it answers, so the record is never seen without a driver
        # that runs it, and is the driver's alone from then on. A driver of older code may have exited since it was
        # looked up (it retires after its last job): the pool is looked up again, which starts one in its place.
        for attempt in range(2):
            driver = self._least_busy(self._drivers())
            try:
                handle = self.tile_model_handles[spec.key]
                ray.get(driver.start.remote(self.config, status, sources, handle, candidate))
                return status
            except RayActorError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def status(self, job_id: str, tenant_id: str) -> WsiJobStatus:
        return self._refreshed([self.records.load(job_id, tenant_id)])[0]

    def of_tenant(self, tenant_id: str) -> list[WsiJobStatus]:
        return self._refreshed(self.records.of_tenant(tenant_id))

    async def cancel(self, job_id: str, tenant_id: str) -> WsiJobStatus:
        """Stop sending work; what is finished stays, and the same ``out`` resumes it later."""
        status = await asyncio.to_thread(self.status, job_id, tenant_id)
        if not status.state.active:
            return status
        answers = await asyncio.gather(*(d.cancel.remote(job_id) for d in _named_drivers()), return_exceptions=True)
        if any(answer is True for answer in answers):
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

    def _source(self, raw: str | DicomwebSlideRef, policy: SlidePolicy, tenant_id: str) -> SlideSource:
        """What a job reads for one slide as submitted: a path's real path inside the tenant's roots, or a series on a
        PACS the tenant may use (its address from the config)."""
        if isinstance(raw, str):
            return str(policy.resolve(raw))
        name, config = self._pacs(raw.pacs, tenant_id)
        return DicomwebSlide(name, config, raw.study_instance_uid, raw.series_instance_uid)

    def _pacs(self, name: str, tenant_id: str) -> tuple[str, PacsConfig]:
        """A PACS a request names: 422 for one this server does not have, 403 for one the tenant may not use."""
        config = self.config.pacs.get(name)
        usable = sorted(other for other, pacs in self.config.pacs.items() if pacs.allows(tenant_id))
        if config is None:
            raise InvalidRequestBody(
                f"PACS {name!r} is not configured on this server (this tenant may use: {', '.join(usable) or 'none'})"
            )
        if not config.allows(tenant_id):
            raise Forbidden(f"tenant {tenant_id} may not use PACS {name!r} (its pacs.{name}.tenants)")
        return name, config

    def _slide_roots(self, tenant_id: str) -> list[Path]:
        """The folders the tenant's slides may come from, besides its uploads: its own with tenants configured, the
        server's on an open server."""
        if self.config.tenants:
            return self.config.tenants[tenant_id].wsi_slide_roots
        return self.wsi.slide_roots

    def _refreshed(self, jobs: list[WsiJobStatus]) -> list[WsiJobStatus]:
        """The records, those that say active while no driver runs their job marked interrupted (the driver's
        process or its node died); left as they are if a driver does not answer."""
        if not any(job.state.active for job in jobs):
            return jobs
        running = _running_jobs()
        if running is None:
            return jobs
        refreshed = []
        for job in jobs:
            if job.state.active and job.job_id not in running:
                # Read again: a driver saves a job's last record before it lets go of the job, so a job that ended
                # between the first read and the drivers' answer has its final record on disk by now.
                job = self.records.load(job.job_id, job.tenant)
                if job.state.active:
                    job.state = JobState.interrupted
            refreshed.append(job)
        return refreshed

    def _drivers(self) -> list:
        """This code's pool of drivers, each started if it is not running (a first call, or one killed for good)."""
        return [
            WsiJobDriver.options(name=name, namespace=DRIVER_NAMESPACE, lifetime="detached", get_if_exists=True).remote(
                code_version()
            )
            for name in driver_names(self.wsi.job_drivers)
        ]

    @staticmethod
    def _least_busy(drivers: list):
        """The driver running the fewest jobs; the first of the pool if none answers in time."""
        loads = []
        for driver in drivers:
            try:
                loads.append(len(ray.get(driver.job_ids.remote(), timeout=_DRIVER_ANSWER_S)))
            except (GetTimeoutError, RayActorError):
                loads.append(float("inf"))
        return drivers[loads.index(min(loads))]


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


def _named_drivers() -> list:
    """Every driver running now, of this code's pool and of older ones still finishing their jobs."""
    drivers = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == DRIVER_NAMESPACE and actor["name"].startswith(DRIVER_PREFIX):
            try:
                drivers.append(ray.get_actor(actor["name"], namespace=DRIVER_NAMESPACE))
            except ValueError:  # gone since listed
                continue
    return drivers


def _running_jobs() -> set[str] | None:
    """The ids of the jobs the drivers run; None if one of them did not answer in time (nothing is certain)."""
    running: set[str] = set()
    answers = {driver: driver.job_ids.remote() for driver in _named_drivers()}
    for reference in answers.values():
        try:
            running.update(ray.get(reference, timeout=_DRIVER_ANSWER_S))
        except (GetTimeoutError, ActorUnavailableError):  # busy, or out of reach for now
            return None
        except RayActorError:  # died for good: it runs nothing
            continue
    return running


def driver_of(job_id: str):
    """The driver running job ``job_id``, or None."""
    for driver in _named_drivers():
        try:
            if job_id in ray.get(driver.job_ids.remote(), timeout=_DRIVER_ANSWER_S):
                return driver
        except (GetTimeoutError, RayActorError):
            continue
    return None


def _retire_other_pools() -> None:
    """Drivers of other code (an upgrade, a redeploy of changed code) take no more jobs and exit after their last."""
    current = set(driver_names(64))
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] != DRIVER_NAMESPACE or not actor["name"].startswith(DRIVER_PREFIX):
            continue
        if actor["name"] not in current:
            try:
                ray.get_actor(actor["name"], namespace=DRIVER_NAMESPACE).retire.remote()
            except ValueError:
                continue


def _slide_key(slide: str | DicomwebSlideRef | DicomwebSlide) -> str:
    """A slide's folder in the job's output folder: its name (a PACS slide's: the PACS's), and a hash of its path or
    UIDs (names may repeat)."""
    if not isinstance(slide, str):
        identity = f"dicomweb:{slide.pacs}/{slide.study_instance_uid}/{slide.series_instance_uid}"
        return f"{slide.pacs}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    path = slide
    stem = PurePosixPath(path).stem or "slide"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:64]
    return f"{safe}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
