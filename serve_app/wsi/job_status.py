"""What a WSI job is and how far it got: the request that submits it, its status, its slides' summaries.

The status is the job's record, kept as JSON at ``<wsi.output_root>/jobs/<job_id>.json`` on shared storage:
the job's driver rewrites it (atomically) as it goes, the API and the CLI read it, and it outlives the
cluster. Slide paths appear here and in the API's answers to the tenant who sent them, never in logs,
metrics or audit lines.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.config.pacs import PacsName
from serve_app.dicomweb.messages import Uid
from serve_app.errors import ResultNotFound
from serve_app.segmentation.responses import PacsStoreOutcome
from serve_app.storage import write_atomic

__all__ = [
    "OUT_PATTERN",
    "UPLOADS_FOLDER",
    "DicomwebSlideRef",
    "JobRecords",
    "JobState",
    "PhaseSeconds",
    "SlideState",
    "SlideStatus",
    "SlideSummary",
    "SlideUpload",
    "WsiJobList",
    "WsiJobRequest",
    "WsiJobStatus",
]

OUT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
UPLOADS_FOLDER = "uploads"  # a tenant's uploaded slides, beside its jobs' out folders
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"  # every slide finished, some perhaps with an error of their own
    failed = "failed"  # every slide failed, or the job itself did
    cancelled = "cancelled"
    interrupted = "interrupted"  # its driver died; resubmit with the same `out` to resume

    @property
    def active(self) -> bool:
        return self in (JobState.queued, JobState.running)


class SlideState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class DicomwebSlideRef(BaseModel):
    """A slide on a PACS: a DICOM WSI series, named by the PACS's name in the server's ``pacs`` config section (never
    an address) and its UIDs."""

    model_config = ConfigDict(extra="forbid")

    pacs: PacsName = Field(description="A PACS of the server's `pacs` config section that the tenant may use.")
    study_instance_uid: Uid = Field(description="The slide's StudyInstanceUID.")
    series_instance_uid: Uid = Field(description="The slide's SeriesInstanceUID (a VL Whole Slide Microscopy series).")


class WsiJobRequest(BaseModel):
    """``POST /v1/wsi/jobs``: slides to run through a tile classifier. A misspelt key is refused (422), not ignored;
    the body is at most 64 KiB, like every JSON body (about 500 slide paths: split a larger night into jobs)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A tile_classification model of GET /v1/models.")
    slides: list[str | DicomwebSlideRef] = Field(
        min_length=1,
        max_length=1_000,
        description="Each slide: a path on shared storage, inside the tenant's wsi_slide_roots (an open server's "
        "wsi.slide_roots), or returned by POST /v1/wsi/slides; or a DICOM WSI series on a configured PACS, "
        '{"pacs", "study_instance_uid", "series_instance_uid"}. A slide that cannot be read fails alone; the others '
        "run. The body holding them is at most 64 KiB.",
    )
    out: str | None = Field(
        None,
        pattern=OUT_PATTERN,
        description="Output folder name, under the tenant's folder of wsi.output_root; default: the job id. "
        "A job submitted again with the same out resumes: finished chunks are not redone.",
    )
    mpp: float | None = Field(
        None, gt=0, le=100, description="Microns per pixel of level 0, for slides whose files do not say."
    )
    store_to: PacsName | None = Field(
        None,
        description="A PACS of the server's `pacs` config section (that the tenant may use) to store each DICOM "
        "slide's results to, by STOW-RS: its tiles and tumour regions (annotations.dcm, Microscopy Bulk Simple "
        "Annotations) and its probability map (probabilities.dcm, Parametric Map); null: none.",
    )

    @field_validator("out")
    @classmethod
    def _not_the_uploads(cls, out: str | None) -> str | None:
        if out == UPLOADS_FOLDER:
            raise ValueError(f"out {out!r} is the tenant's folder of uploaded slides; choose another name")
        return out


class PhaseSeconds(BaseModel):
    """Seconds a slide spent in each phase, summed over its work units (they overlap one another)."""

    open: float = Field(0.0, description="Opening the file and planning the tile grid.")
    tissue: float = Field(0.0, description="Tissue detection on a low-resolution level.")
    read: float = Field(0.0, description="Reading and decoding tile regions (in the replicas).")
    inference: float = Field(0.0, description="The tile model, tiles in and probabilities out (in the replicas).")
    write: float = Field(0.0, description="Heatmap chunks, the overlay, the GeoJSON and this summary.")


class SlideSummary(BaseModel):
    """One slide's result; also written as ``summary.json`` beside its heatmap."""

    reader: str = Field(description="What read the slide: tifffile, cucim, openslide or wsidicom.")
    level: int = Field(description="The pyramid level tiles were read from (0: full resolution).")
    level_mpp: float = Field(description="Microns per pixel of that level.")
    scale: float = Field(description="Level pixels per model pixel: 1 when the level's mpp is the model's.")
    tile_size: int = Field(description="Model tile side, pixels at the model's mpp.")
    mpp: float = Field(description="The model's microns per pixel.")
    grid: tuple[int, int] = Field(description="Tiles (rows, cols) over the slide: the heatmap's shape.")
    tiles_total: int = Field(description="Tiles of the grid.")
    tiles_tissue: int = Field(description="Tiles holding tissue: the ones classified.")
    tiles_positive: int = Field(description="Tissue tiles whose probability is at least 0.5.")
    tumour_area_mm2: float = Field(description="Area of the positive tiles, mm².")
    tissue_area_mm2: float = Field(description="Area of the tissue tiles, mm².")
    chunks_total: int = Field(description="Work units holding tissue.")
    chunks_resumed: int = Field(description="Of those, finished by an earlier run into the same out folder.")
    seconds: PhaseSeconds = Field(description="Where the time went.")
    annotations: bool = Field(
        False,
        description="Whether annotations.dcm was written: the tiles and tumour regions as DICOM Microscopy Bulk "
        "Simple Annotations on the slide's image (DICOM slides only).",
    )
    stored: PacsStoreOutcome | None = Field(
        None,
        description="What became of storing annotations.dcm and probabilities.dcm to the job's store_to PACS (DICOM "
        "slides only); null: not asked.",
    )
    classify_wall_s: float = Field(
        description="Wall seconds from the slide's first work unit sent to its last written (this run's)."
    )


class SlideStatus(BaseModel):
    slide: str | DicomwebSlideRef = Field(description="The slide as submitted.")
    key: str = Field(description="The slide's folder in the job's output folder.")
    state: SlideState = Field(SlideState.queued, description="queued, running, done, failed or cancelled.")
    tiles_total: int | None = Field(None, description="Tissue tiles to classify, once tissue detection ran.")
    tiles_done: int = Field(0, description="Tissue tiles classified (this run and earlier ones).")
    error: str | None = Field(None, description="Why the slide failed; the other slides are not affected.")
    summary: SlideSummary | None = Field(None, description="The result, once done.")


class WsiJobStatus(BaseModel):
    """A job's record: ``GET /v1/wsi/jobs/{id}``."""

    job_id: str = Field(description="The job's id.")
    tenant: str = Field(description="The tenant who submitted it.")
    model: str = Field(description="The tile classifier.")
    model_version: str = Field(description="Its version.")
    state: JobState = Field(JobState.queued, description="queued, running, done, failed, cancelled or interrupted.")
    out: str = Field(description="The output folder's name (under the tenant's folder of wsi.output_root).")
    out_path: str = Field(description="The output folder on shared storage; one sub-folder per slide.")
    mpp: float | None = Field(None, description="The mpp given for slides without resolution metadata.")
    store_to: str | None = Field(None, description="The PACS each DICOM slide's annotations are stored to.")
    created: datetime = Field(description="When it was submitted (UTC).")
    finished: datetime | None = Field(None, description="When it ended (UTC).")
    tiles_total: int = Field(0, description="Tissue tiles of the slides planned so far.")
    tiles_done: int = Field(0, description="Tissue tiles classified.")
    tiles_per_s: float = Field(0.0, description="Recent speed.")
    eta_s: float | None = Field(None, description="Seconds to go at that speed, once every slide is planned.")
    error: str | None = Field(None, description="Why the job as a whole failed.")
    slides: list[SlideStatus] = Field(description="Each slide's state, in the order submitted.")

    @property
    def planned(self) -> bool:
        return all(s.tiles_total is not None or s.state is SlideState.failed for s in self.slides)


class WsiJobList(BaseModel):
    jobs: list[WsiJobStatus] = Field(description="The tenant's jobs, newest first.")


class SlideUpload(BaseModel):
    """``POST /v1/wsi/slides``: where an uploaded slide was stored, to name in a job."""

    slide: str = Field(description="The stored slide's path: give it in a job's slides.")
    bytes: int = Field(description="Bytes received.")


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobRecords:
    """The job records of one ``wsi.output_root``: one JSON file per job, replaced whole on each save."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def save(self, status: WsiJobStatus) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path(status.job_id), status.model_dump_json(indent=1))  # readers never see half a record

    def load(self, job_id: str, tenant_id: str) -> WsiJobStatus:
        """The tenant's job; another tenant's, or none, is a 404 (not a 403: ids are not to be probed)."""
        if not _JOB_ID.match(job_id):
            raise ResultNotFound("no such WSI job (job ids are 32 hex digits)")
        try:
            status = WsiJobStatus.model_validate_json(self.path(job_id).read_text())
        except (OSError, ValueError):
            raise ResultNotFound(f"no WSI job {job_id}") from None
        if status.tenant != tenant_id:
            raise ResultNotFound(f"no WSI job {job_id}")
        return status

    def of_tenant(self, tenant_id: str) -> list[WsiJobStatus]:
        jobs = [status for status in self.every() if status.tenant == tenant_id]
        return sorted(jobs, key=lambda s: s.created, reverse=True)

    def every(self) -> list[WsiJobStatus]:
        """Every tenant's job records."""
        jobs = []
        for path in self.folder.glob("*.json"):
            try:
                jobs.append(WsiJobStatus.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced, or not ours
        return jobs
