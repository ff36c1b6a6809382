"""WsiJobDriver: the pool of long-lived Ray actors that run WSI jobs, from their slides to their heatmaps.

The path of a job, by file::

    serve_app/wsi/jobs.py         the API's side: check paths and quotas, hand the job to a driver of the pool
    serve_app/wsi/job_driver.py   a driver: plan each slide, send its work units, write what comes back
      serve_app/wsi/slides.py     open the slide with the reader for its format (readers/), its levels and mpp
      serve_app/wsi/tiling.py     the tile grid at the model's mpp
      serve_app/wsi/tissue.py     tissue detection on a low-resolution level: which tiles to classify
    deployments/tile_model.py     the tile model's replicas (Serve, autoscaled): read a unit, classify it
    serve_app/wsi/heatmaps.py     the Zarr heatmap, chunk by chunk, and its ledger of finished chunks
    serve_app/wsi/renderings.py   overlay PNG, tissue PNG, QuPath GeoJSON of the tiles and of the tumour regions
    serve_app/wsi/regions.py      the heatmap thresholded into tumour regions: polygons with holes, specks left out
    serve_app/wsi/annotations.py  tiles and regions as DICOM Microscopy Bulk Simple Annotations, the heatmap as a
                                  DICOM Parametric Map, stored to a PACS if asked

The drivers are ``wsi.job_drivers`` detached actors, started with the application (``WsiJobs``) and restarted by
Ray if their process dies; each runs any number of jobs at once (asyncio: a job mostly waits on the tile model), so
a job starts without waiting for a process. A driver's actor name carries a digest of medserve's source: after an
upgrade the application starts a new pool, and the old drivers finish their jobs and exit.

Ray does the scheduling: a job only keeps ``wsi.chunks_in_flight`` units sent to the model's
``TileModelDeployment``, whose autoscaling adds replicas while that backlog lasts and removes
them when it drains; several jobs share the replicas. A unit's probabilities are written to the heatmap
as soon as they come back, and recorded finished only then, so a job killed at any moment (its driver's process
with it) and submitted again into the same ``out`` folder redoes nothing that was finished and ends with the same
heatmap. A restarted driver knows none of the jobs it ran: their records say ``interrupted``.

With a shadow rollout of the job's model (``rollouts.<model>``, docs/rollouts.md), each slide the live version
finished is also run through the candidate version afterwards, in a task of its own that the job's end does not wait
for: its heatmap and a ``summary.json`` in ``<out>/.shadow/<candidate version>/<slide key>/`` (never served by the
API, never stored to a PACS), its agreement with the live heatmap recorded in the rollout's runs. The rollout's
``max_shadow_in_flight`` bounds those runs per driver; a slide that finds them all busy is not shadowed (dropped).

Nothing of a job's fixed cost waits for its last unit that need not: the next slide is opened and its tissue found
while the current one's units run; the overlay is painted and the GeoJSON's features made as each unit comes back,
and the thumbnail is read and the tissue PNG encoded beside the units; after the last unit only the files are
written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import ray
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.errors import PacsFailed, RequestError, unwrap
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelSpec, TilePreprocessingSpec
from serve_app.observability.input_drift import input_monitor
from serve_app.observability.input_features import slide_features
from serve_app.observability.metrics import WsiJobMetrics
from serve_app.results.agreement import HeatmapAgreement, heatmap_agreement
from serve_app.segmentation.responses import PacsStoreOutcome
from serve_app.segmentation.rollouts import Rollout, Rollouts, content_identity, rollout_id
from serve_app.source_digest import source_digest
from serve_app.stopwatch import Stopwatch
from serve_app.storage import set_private_umask, write_atomic
from serve_app.tenancy.audit import AuditLog
from serve_app.wsi.annotations import described_slide, probability_map, reference_image, slide_annotations
from serve_app.wsi.heatmaps import HeatmapStore
from serve_app.wsi.job_status import (
    JobRecords,
    JobState,
    PhaseSeconds,
    SlideState,
    SlideStatus,
    SlideSummary,
    WsiJobStatus,
    utc_now,
)
from serve_app.wsi.regions import TumourRegion, tumour_regions
from serve_app.wsi.renderings import (
    OverlayPainter,
    TileFeatures,
    tissue_png,
    write_in_place,
    write_regions_geojson,
)
from serve_app.wsi.slides import DicomwebSlide, Slide, open_slide
from serve_app.wsi.tiling import TileGrid, plan_grid
from serve_app.wsi.tissue import TissueMask, detect_tissue
from serve_app.wsi.work_units import ChunkProbabilities, SlideSource, TileChunk

__all__ = [
    "ANNOTATIONS_FILE",
    "DRIVER_NAMESPACE",
    "DRIVER_PREFIX",
    "PROBABILITY_MAP_FILE",
    "REGIONS_FILE",
    "SHADOW_FOLDER",
    "JobRun",
    "WsiJobDriver",
    "code_version",
    "driver_names",
    "slide_identity",
]

logger = logging.getLogger(__name__)
DRIVER_NAMESPACE = "medserve-wsi"
ANNOTATIONS_FILE = "annotations.dcm"  # tiles and regions as DICOM Microscopy Bulk Simple Annotations (DICOM slides)
PROBABILITY_MAP_FILE = "probabilities.dcm"  # the heatmap as a DICOM Parametric Map
REGIONS_FILE = "regions.geojson"  # the tumour regions as QuPath annotations
SHADOW_FOLDER = ".shadow"  # in a job's out folder: a shadow rollout's candidate runs, by version and slide key
_POSITIVE = 0.5  # a tile is tumour at this probability or above: tiles_positive, tumour_area_mm2, rollout agreement
DRIVER_PREFIX = "wsi-job-driver"
_SAVE_EVERY_S = 0.5  # the record is rewritten at most this often while tiles finish
_SPEED_WINDOW_S = 10.0  # tiles/s is measured over this much recent time
_THUMBNAIL_SIDE = 2048
# Ray exports a worker's metrics every 10 s (metrics_report_interval_ms): a driver that exited at once
# would take its last counts with it.
_METRICS_FLUSH_S = 12.0
# A driver's process is replaced (Ray restarts it) once idle after this many jobs: each job's progress gauge, labelled
# with its id, lives as long as the process, and would otherwise pile up.
_RECYCLE_AFTER_JOBS = 100


def code_version() -> str:
    """A short digest of the code this process runs (``source_digest``): drivers of other code are another pool."""
    return source_digest()[:12]


def driver_names(count: int) -> list[str]:
    """The actor names of this code's pool of ``count`` drivers."""
    return [f"{DRIVER_PREFIX}-{code_version()}-{i}" for i in range(count)]


# Restarted by Ray whenever its process dies; a call made meanwhile waits for the restarted driver and is answered by
# it (a call in flight when the process died is made again: each of them may be).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class WsiJobDriver:
    """One driver of the pool: ``start`` hands it a job, which it runs beside its others; ``job_ids`` says which it
    runs, ``cancel`` stops one, ``retire`` makes it exit once it runs none (an older pool's).

    Args:
        version: the code version its name was given for (``code_version()`` where the application runs); a
            driver whose own code differs (the package was upgraded in between) retires from the start.
    """

    def __init__(self, version: str):
        set_private_umask()  # the heatmaps, renderings and records it writes are the patient's: 0600, 0700
        self.runs: dict[str, JobRun] = {}
        self.jobs_run = 0
        # One per rollout this driver shadows, by its ledger's folder and id: its shadow slots bound the candidate's
        # runs over every job here.
        self.rollouts: dict[tuple[str, ...], Rollout] = {}
        self._tasks: set[asyncio.Task] = set()
        self.retiring = version != code_version()

    async def start(
        self,
        config: AppConfig,
        status: WsiJobStatus,
        slide_sources: list[SlideSource | None],
        tile_model: DeploymentHandle,
        candidate_model: DeploymentHandle | None = None,
    ) -> None:
        """Take a job: its first record is saved before this returns, then it runs in the background.

        Args:
            config: the application's config (``wsi``, the model repository).
            status: the job's record as submitted; slides refused at submission are already ``failed``.
            slide_sources: each slide's checked real path, or its series on a PACS the tenant may use; None for
                those refused.
            tile_model: the handle of the model's ``TileModelDeployment``.
            candidate_model: with a rollout of the model (``rollouts.<model>``), the handle of its candidate
                version's ``TileModelDeployment``, which shadows the slides the live version finishes.
        """
        shadow = None
        if candidate_model is not None:
            rollout_config = config.rollouts[status.model]
            key = (config.name, str(config.storage.root), status.model, rollout_id(status.model, rollout_config))
            if key not in self.rollouts:
                rollout = await asyncio.to_thread(_rollout_of, config, status.model)
                self.rollouts.setdefault(key, rollout)
            shadow = _Shadow(self.rollouts[key], candidate_model)
        run = await asyncio.to_thread(JobRun, config, status, slide_sources, tile_model, shadow)
        self.runs[status.job_id] = run
        run.save(force=True)  # the job's first record: saved here, so the API never overwrites the driver's
        task = asyncio.create_task(self._run(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def job_ids(self) -> list[str]:
        """The jobs this driver runs now."""
        return list(self.runs)

    def cancel(self, job_id: str) -> bool:
        """Send no more of the job's work units; whether this driver runs it."""
        run = self.runs.get(job_id)
        if run is not None:
            run.cancel()
        return run is not None

    def retire(self) -> None:
        """Exit once no job runs here: the application has started a pool of newer code, which takes its jobs."""
        self.retiring = True
        if not self.runs:
            ray.actor.exit_actor()

    async def _run(self, run: JobRun) -> None:
        try:
            await run.run()
        finally:
            self.runs.pop(run.status.job_id, None)
            self.jobs_run += 1
        await run.shadowed()  # the candidate's runs on its slides: after the job's end, never before it
        if (self.retiring or self.jobs_run >= _RECYCLE_AFTER_JOBS) and not self.runs:
            await asyncio.sleep(_METRICS_FLUSH_S)  # the last job's metrics exported first
            if not self.runs:
                # Retiring: gone for good. Recycled: Ray starts the driver again, in a new process.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=self.retiring)


@dataclass
class _SlidePlan:
    """A slide opened and planned: its grid, its tissue, its heatmap store, and its outputs as they build up."""

    source: SlideSource
    slide: Slide
    grid: TileGrid
    tissue: TissueMask
    tissue_tiles: np.ndarray  # (rows, cols) bool: the tiles to classify
    store: HeatmapStore
    seconds: PhaseSeconds
    heatmap: np.ndarray  # (rows, cols) float32: what the store's ledger vouches for so far, NaN elsewhere
    features: TileFeatures  # the GeoJSON's features of the tiles in ``heatmap``
    units_total: int = 0  # work units holding tissue
    units_resumed: int = 0  # of those, finished by an earlier run into the same folder
    classify_wall_s: float = 0.0
    painter: OverlayPainter | None = None  # once the thumbnail is read
    tissue_png: bytes | None = None  # encoded beside the units, written with the other outputs
    lock: threading.Lock = field(default_factory=threading.Lock)  # heatmap and painter, between unit threads

    def finished(self, rows: slice, cols: slice, probabilities: np.ndarray) -> None:
        """A unit's probabilities, written and recorded: into the heatmap, the overlay and the GeoJSON's features."""
        self.features.add(rows, cols, probabilities)
        with self.lock:
            self.heatmap[rows, cols] = probabilities
            if self.painter is not None:
                self.painter.paint(rows, cols, probabilities)

    def prepare_renderings(self) -> None:
        """Read the thumbnail, paint what is finished so far, encode the tissue PNG: in a thread, beside the units."""
        thumbnail = self.slide.thumbnail(_THUMBNAIL_SIDE)
        level0 = self.slide.levels[0]
        per_level0 = thumbnail.shape[1] / level0.width  # thumbnail pixels per level-0 pixel
        grid = self.grid
        extent = (grid.rows * grid.tile_extent_level0 * per_level0, grid.cols * grid.tile_extent_level0 * per_level0)
        painter = OverlayPainter(thumbnail, (grid.rows, grid.cols), extent=extent)
        with self.lock:
            painter.paint(slice(0, grid.rows), slice(0, grid.cols), self.heatmap)
            self.painter = painter
        self.tissue_png = tissue_png(self.tissue.mask, mpp=self.tissue.mpp)


@dataclass(frozen=True)
class _DicomResults:
    """A slide's DICOM objects as written (None: not made), the frame of reference they are on, and whether they stand
    on the slide's own image (so that a PACS holds what they reference)."""

    annotations: pydicom.Dataset | None
    probability_map: pydicom.Dataset | None
    frame_of_reference: str | None
    on_slide: bool


def _save_dicom(dataset: pydicom.Dataset, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    dataset.save_as(partial, enforce_file_format=True)
    partial.replace(path)


class SlideFailed(Exception):
    """One slide cannot go on; its reason goes into its status, the job's other slides continue."""


class _ShadowStopped(Exception):
    """A shadow run given up half-way (the job cancelled, the rollout no longer running): nothing to record."""


@dataclass(frozen=True)
class _Shadow:
    """A job's shadow rollout: the rollout (its candidate, state and records) and its candidate's replicas."""

    rollout: Rollout
    tile_model: DeploymentHandle


@dataclass(frozen=True)
class _LiveSlide:
    """What a shadow run of a slide compares its candidate's heatmap with: the live run's."""

    heatmap: np.ndarray
    grid: TileGrid
    tumour_area_mm2: float


def _rollout_of(config: AppConfig, model: str) -> Rollout:
    """The model's rollout as a driver runs it; an abort it decides is audited under the driver's name."""
    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    audit = AuditLog(config.audit, config.storage.root, f"{name or f'pid{os.getpid()}'}-{config.name}")
    rollout = Rollouts(config, ModelRepository(config.model_repository), audit).of(model)
    assert rollout is not None  # the caller found it in config.rollouts
    return rollout


def slide_identity(source: SlideSource) -> str:
    """What makes two submissions the same slide, wherever its file lies: a PACS series' SeriesInstanceUID, else a
    digest of the sizes and first MiB of its file (or of the files of its DICOM folder). Never logged or stored: only
    hashed with a rollout's id."""
    if isinstance(source, DicomwebSlide):
        return f"dicom-series:{source.series_instance_uid}"
    path = Path(source)
    return "slide:" + content_identity(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])


class JobRun:
    """One job on its driver: ``run`` it to its end, ``cancel`` it."""

    def __init__(
        self,
        config: AppConfig,
        status: WsiJobStatus,
        slide_sources: list[SlideSource | None],
        tile_model: DeploymentHandle,
        shadow: _Shadow | None = None,
    ):
        self.config, self.wsi = config, config.wsi
        self.status, self.slide_sources = status, slide_sources
        self.spec = ModelRepository(config.model_repository).get(status.model, status.model_version)
        self.records = JobRecords(self.wsi.jobs)
        self.out = Path(status.out_path)
        self.tile_model = tile_model
        self.shadow = shadow
        self._shadow_runs: set[asyncio.Task] = set()
        self.cancelled = False
        self.metrics = WsiJobMetrics(status.job_id, status.model, status.tenant)
        self.input_monitor = input_monitor(config.input_monitoring.window_inputs)
        self._saved_at = 0.0
        self._speed: deque[tuple[float, int]] = deque()  # (time, tiles this run classified by then)

    async def run(self) -> None:
        self.status.state = JobState.running
        self.save(force=True)
        self.slide_slots = asyncio.Semaphore(self.wsi.slides_in_flight)
        # One slide opened and planned at a time, in order: the first slide's units start as soon as it alone is
        # planned, and each next one is planned while the slides before it run their units.
        self.planning = asyncio.Lock()
        self.unit_slots = asyncio.Semaphore(self.wsi.chunks_in_flight)
        try:
            await asyncio.gather(*(self._run_slide(i) for i, s in enumerate(self.status.slides) if not _ended(s)))
            self.status.state = self._final_state()
        except Exception as e:  # a bug of the driver itself: the record says so rather than "running" forever
            # Where it failed, without the error's message: an OSError's names the slide's file.
            frames = "".join(traceback.format_tb(e.__traceback__))
            logger.error("WSI job %s: its driver failed (%s)\n%s", self.status.job_id, type(e).__name__, frames)
            self.status.state, self.status.error = JobState.failed, f"the job's driver failed ({type(e).__name__})"
        self.status.finished = utc_now()
        self.status.eta_s = None
        self.save(force=True)
        self.metrics.finished(self.status.state.value)

    def cancel(self) -> None:
        """Send no more work units; those in flight finish and are kept, so the job can be resumed."""
        self.cancelled = True

    async def shadowed(self) -> None:
        """Until the candidate's shadow runs of this job's slides have ended."""
        while self._shadow_runs:
            await asyncio.gather(*self._shadow_runs, return_exceptions=True)

    def _final_state(self) -> JobState:
        if self.cancelled:
            return JobState.cancelled
        if all(s.state is SlideState.failed for s in self.status.slides):
            return JobState.failed
        return JobState.done

    async def _run_slide(self, index: int) -> None:
        status = self.status.slides[index]
        plan = renderings = None
        watch = Stopwatch()
        try:
            # A slide holds its slot from its planning to its last unit: its outputs are written after, while the
            # next slide's units run.
            async with self.slide_slots:
                async with self.planning:
                    if self.cancelled:
                        status.state = SlideState.cancelled
                        return
                    status.state = SlideState.running
                    self.save(force=True)
                    plan = await asyncio.to_thread(self._plan, self.slide_sources[index], self.out / status.key)
                renderings = asyncio.create_task(asyncio.to_thread(plan.prepare_renderings))
                await self._classify_slide(status, plan)
            if self.cancelled:
                status.state = SlideState.cancelled
            else:
                await renderings
                status.summary = await self._write_outputs(plan)
                status.state = SlideState.done
                if self.shadow is not None:
                    live = _LiveSlide(plan.heatmap, plan.grid, status.summary.tumour_area_mm2)
                    task = asyncio.create_task(self._rolled_out(index, live, watch.total_s))
                    self._shadow_runs.add(task)
                    task.add_done_callback(self._shadow_runs.discard)
        except (SlideFailed, RequestError, OSError, ValueError) as e:
            status.state, status.error = SlideState.failed, _reason(e)
        finally:
            if renderings is not None:
                await asyncio.gather(renderings, return_exceptions=True)  # it reads the slide: done before close
            if plan is not None:
                plan.slide.close()
        self.save(force=True)

    def _plan(self, source: SlideSource | None, folder: Path, spec: ModelSpec | None = None) -> _SlidePlan:
        """Open the slide, choose its level, find its tissue, open (or reopen) its heatmap: in a thread. ``spec``: the
        version whose tiles and heatmap these are, the job's unless a shadow's candidate."""
        spec = spec or self.spec
        if source is None:
            raise SlideFailed("the slide was refused at submission")
        if isinstance(source, str) and not Path(source).is_file() and not Path(source).is_dir():  # a folder: DICOM WSI
            raise SlideFailed("no such file or folder (or not a regular file)")
        preprocessing = spec.preprocessing
        assert isinstance(preprocessing, TilePreprocessingSpec)
        watch = Stopwatch()
        slide = open_slide(source, mpp=self.status.mpp)
        try:
            grid = plan_grid(slide, tile_size=preprocessing.tile_size, mpp=preprocessing.mpp)
            open_s = watch.lap()
            tissue = detect_tissue(slide)
            tissue_tiles = tissue.tile_fractions(grid) >= self.wsi.min_tissue_fraction
            tissue_s = watch.lap()
            if spec is self.spec:  # input monitoring: what arrives, once
                slide_summary = slide_features(slide.levels[0].mpp, tissue.stain_od)
                self.input_monitor.observe(spec.name, spec.version, spec.folder, slide_summary)
            store = HeatmapStore.open(
                folder / "heatmap.zarr",
                rows=grid.rows,
                cols=grid.cols,
                chunk_tiles=self.wsi.chunk_tiles,
                attributes=self._heatmap_attributes(grid, spec),
            )
            # What an earlier run into this folder finished (NaN elsewhere): the outputs start from it.
            heatmap = store.read() if store.finished_chunks() else np.full(grid.shape, np.nan, np.float32)
            features = TileFeatures(grid.shape, tile_extent_level0=grid.tile_extent_level0)
            features.add(slice(0, grid.rows), slice(0, grid.cols), heatmap)
        except BaseException:
            slide.close()
            raise
        seconds = PhaseSeconds(open=open_s, tissue=tissue_s)
        return _SlidePlan(source, slide, grid, tissue, tissue_tiles, store, seconds, heatmap, features)

    def _heatmap_attributes(self, grid: TileGrid, spec: ModelSpec) -> dict:
        return {
            "model": spec.name,
            "model_version": spec.version,
            "level": grid.level.index,
            "level_mpp": grid.level.mpp,
            "tile_size": grid.tile_size,
            "mpp": grid.mpp,
            "scale": grid.scale,
            "tile_extent_level0": grid.tile_extent_level0,
            "label": spec.labels[1].name,
        }

    async def _classify_slide(self, status: SlideStatus, plan: _SlidePlan) -> None:
        """Send the slide's unfinished units with tissue, at most ``chunks_in_flight`` at once job-wide."""
        store = plan.store
        units = [
            (r, c)
            for r in range(store.chunk_grid[0])
            for c in range(store.chunk_grid[1])
            if self._tissue_of(plan, r, c).any()
        ]
        finished = store.finished_chunks()
        todo = [unit for unit in units if unit not in finished]
        plan.units_total, plan.units_resumed = len(units), len(units) - len(todo)
        status.tiles_total = int(plan.tissue_tiles.sum())
        status.tiles_done = status.tiles_total - int(sum(self._tissue_of(plan, *unit).sum() for unit in todo))
        self._count_planned()
        watch = Stopwatch()
        await asyncio.gather(*(self._classify_unit(status, plan, r, c) for r, c in todo))
        plan.classify_wall_s = watch.total_s

    def _tissue_of(self, plan: _SlidePlan, chunk_row: int, chunk_col: int) -> np.ndarray:
        """(h, w) bool: the tissue tiles of one work unit."""
        return plan.tissue_tiles[plan.store.tiles_of_chunk(chunk_row, chunk_col)]

    def _unit(self, plan: _SlidePlan, chunk_row: int, chunk_col: int) -> TileChunk:
        """One work unit of ``plan``'s slide, with its tissue tiles."""
        return TileChunk(
            slide=plan.source,
            mpp=self.status.mpp,
            grid=plan.grid,
            chunk_row=chunk_row,
            chunk_col=chunk_col,
            chunk_tiles=self.wsi.chunk_tiles,
            tissue=self._tissue_of(plan, chunk_row, chunk_col),
        )

    async def _classify_unit(self, status: SlideStatus, plan: _SlidePlan, chunk_row: int, chunk_col: int) -> None:
        async with self.unit_slots:
            if self.cancelled or status.state is SlideState.failed:
                return
            chunk = self._unit(plan, chunk_row, chunk_col)
            result = await self._send(chunk)
        watch = Stopwatch()
        await asyncio.to_thread(self._write_unit, plan, chunk_row, chunk_col, result.probabilities)
        plan.seconds.write += watch.lap()
        plan.seconds.read += result.read_s
        plan.seconds.inference += result.inference_s
        tiles = int(chunk.tissue.sum())
        status.tiles_done += tiles
        self._tiles_finished(tiles)

    @staticmethod
    def _write_unit(plan: _SlidePlan, chunk_row: int, chunk_col: int, probabilities: np.ndarray) -> None:
        """The unit's chunk of the heatmap written and recorded finished, then its share of the outputs."""
        plan.store.write_chunk(chunk_row, chunk_col, probabilities)
        rows, cols = plan.store.tiles_of_chunk(chunk_row, chunk_col)
        plan.finished(rows, cols, probabilities.astype(np.float32, copy=False))

    async def _send(self, chunk: TileChunk, tile_model: DeploymentHandle | None = None) -> ChunkProbabilities:
        """One unit to a replica (of the job's version, or of ``tile_model``); again, up to ``wsi.chunk_attempts``
        times, if its replica dies."""
        for attempt in range(1, self.wsi.chunk_attempts + 1):
            try:
                return await (tile_model or self.tile_model).classify.remote(chunk)
            except Exception as e:
                error = unwrap(e)
                if isinstance(error, RequestError):  # the slide's own fault (a corrupt tile): no retry helps
                    raise SlideFailed(error.reason) from None
                if attempt == self.wsi.chunk_attempts:
                    raise SlideFailed(
                        f"a work unit failed {attempt} times ({type(error).__name__}); resubmit to resume"
                    ) from None
                logger.warning(
                    "WSI job %s: a work unit failed (%s), retrying", self.status.job_id, type(error).__name__
                )
        raise AssertionError("unreachable")

    async def _rolled_out(self, index: int, live: _LiveSlide, live_s: float) -> None:
        """A slide the live version finished, for the job's rollout: its record, and, when the rollout shadows it
        and a shadow slot is free, the candidate's run on it and their agreement recorded."""
        assert self.shadow is not None
        rollout, job_id = self.shadow.rollout, self.status.job_id
        where = {"job_id": job_id, "slide_index": index}
        live_run = {"role": "live", "version": self.spec.version, "outcome": "ok", **where}
        await asyncio.to_thread(rollout.record, live_run, live_s)
        if self.cancelled:
            return
        source = self.slide_sources[index]
        identity = await asyncio.to_thread(slide_identity, source) if rollout.needs_identity else None
        if not rollout.shadows(identity) or not rollout.take_shadow_slot():
            return
        version, watch = rollout.candidate.version, Stopwatch()
        try:
            agreement = await self._run_candidate(index, live)
        except _ShadowStopped:
            return
        except Exception as error:
            logger.warning(
                "WSI job %s: a shadow run of %s %s failed: %s", job_id, rollout.model, version, type(error).__name__
            )
            run = {"role": "shadow", "version": version, "outcome": "error", **where}
            await asyncio.to_thread(rollout.record, run)
        else:
            run = {"role": "shadow", "version": version, "outcome": "ok", **where, **agreement.model_dump()}
            await asyncio.to_thread(rollout.record, run, watch.total_s)
        finally:
            rollout.release_shadow_slot()

    async def _run_candidate(self, index: int, live: _LiveSlide) -> HeatmapAgreement:
        """The candidate on slide ``index``: its heatmap and summary in the job's shadow folder, its agreement with
        the live heatmap. Its units go to the candidate's replicas, at most ``chunks_in_flight`` at once."""
        assert self.shadow is not None
        candidate = self.shadow.rollout.candidate
        folder = self.out / SHADOW_FOLDER / candidate.version / self.status.slides[index].key
        plan = await asyncio.to_thread(self._plan, self.slide_sources[index], folder, candidate)
        try:
            store, finished = plan.store, plan.store.finished_chunks()
            todo = [
                (r, c)
                for r in range(store.chunk_grid[0])
                for c in range(store.chunk_grid[1])
                if (r, c) not in finished and self._tissue_of(plan, r, c).any()
            ]
            slots = asyncio.Semaphore(self.wsi.chunks_in_flight)
            units = [asyncio.ensure_future(self._classify_candidate_unit(plan, slots, r, c)) for r, c in todo]
            try:
                await asyncio.gather(*units)
            except BaseException:  # one unit failed or stopped: the others are not sent either
                for unit in units:
                    unit.cancel()
                raise
            return await asyncio.to_thread(self._write_candidate_summary, index, plan, live)
        finally:
            plan.slide.close()

    async def _classify_candidate_unit(
        self, plan: _SlidePlan, slots: asyncio.Semaphore, chunk_row: int, chunk_col: int
    ) -> None:
        assert self.shadow is not None
        async with slots:
            if self.cancelled or self.shadow.rollout.state().state != "running":
                raise _ShadowStopped
            result = await self._send(self._unit(plan, chunk_row, chunk_col), self.shadow.tile_model)
        await asyncio.to_thread(self._write_unit, plan, chunk_row, chunk_col, result.probabilities)

    def _write_candidate_summary(self, index: int, plan: _SlidePlan, live: _LiveSlide) -> HeatmapAgreement:
        """The candidate's agreement with the live heatmap on the live grid, and its ``summary.json``, marked a
        shadow's, beside its heatmap."""
        assert self.shadow is not None
        candidate = self.shadow.rollout.candidate
        tissue, positive, tile_mm2 = _tile_counts(plan.heatmap, plan.grid)
        area_mm2 = round(positive * tile_mm2, 4)
        agreement = heatmap_agreement(
            live.heatmap,
            _on_grid(plan.heatmap, plan.grid, live.grid),
            label=candidate.labels[1].name,
            live_area_mm2=live.tumour_area_mm2,
            candidate_area_mm2=area_mm2,
            threshold=_POSITIVE,
        )
        summary = {
            "rollout": {
                "role": "shadow",
                "version": candidate.version,
                "live_version": self.spec.version,
                "job_id": self.status.job_id,
                "slide_index": index,
            },
            "grid": plan.grid.shape,
            "tile_size": plan.grid.tile_size,
            "mpp": plan.grid.mpp,
            "tiles_tissue": tissue,
            "tiles_positive": positive,
            "tumour_area_mm2": area_mm2,
            "agreement": agreement.model_dump(),
        }
        write_atomic(plan.store.path.parent / "summary.json", json.dumps(summary, indent=1))
        return agreement

    async def _write_outputs(self, plan: _SlidePlan) -> SlideSummary:
        """The slide's files beside its heatmap, from what its units built up: the overlay PNG, the tissue PNG, the
        tiles' GeoJSON and the regions' (then the DICOM objects) in threads side by side (PNG's zlib lets go of the
        GIL), then the summary."""
        watch = Stopwatch()
        folder = plan.store.path.parent
        assert plan.painter is not None and plan.tissue_png is not None  # prepare_renderings ran
        grid = plan.grid
        regions = await asyncio.to_thread(
            tumour_regions,
            plan.heatmap,
            tile_extent_level0=grid.tile_extent_level0,
            tile_um=grid.tile_size * grid.mpp,
            threshold=self.wsi.region_threshold,
            min_area_um2=self.wsi.region_min_area_um2,
        )
        *_, dicom = await asyncio.gather(
            asyncio.to_thread(plan.painter.save, folder / "overlay.png"),
            asyncio.to_thread(write_in_place, folder / "tissue.png", plan.tissue_png),
            asyncio.to_thread(plan.features.write, folder / "tiles.geojson"),
            asyncio.to_thread(write_regions_geojson, folder / REGIONS_FILE, regions),
            asyncio.to_thread(self._write_dicom, folder, plan, regions),
        )
        plan.seconds.write += watch.lap()
        return await asyncio.to_thread(self._write_summary, plan, regions, dicom)

    def _write_summary(self, plan: _SlidePlan, regions: list[TumourRegion], dicom: _DicomResults) -> SlideSummary:
        annotations = dicom.annotations
        to_store = [ds for ds in (annotations, dicom.probability_map) if ds is not None] if dicom.on_slide else []
        stored = self._store(to_store) if to_store and self.status.store_to else None
        heatmap, grid = plan.heatmap, plan.grid
        tissue, positive, tile_mm2 = _tile_counts(heatmap, grid)
        summary = SlideSummary(
            reader=plan.slide.reader,
            level=grid.level.index,
            level_mpp=round(grid.level.mpp, 6),
            scale=round(grid.scale, 6),
            tile_size=grid.tile_size,
            mpp=grid.mpp,
            grid=(grid.rows, grid.cols),
            tiles_total=grid.rows * grid.cols,
            tiles_tissue=tissue,
            tiles_positive=positive,
            tumour_area_mm2=round(positive * tile_mm2, 4),
            tissue_area_mm2=round(tissue * tile_mm2, 4),
            chunks_total=plan.units_total,
            chunks_resumed=plan.units_resumed,
            seconds=PhaseSeconds(**{k: round(v, 3) for k, v in plan.seconds.model_dump().items()}),
            classify_wall_s=round(plan.classify_wall_s, 3),
            annotations=annotations is not None,
            stored=stored,
        )
        # summary.json adds why the reader was chosen, what it left out (other focal planes, optical paths) and the
        # pyramid levels the slide was read as; the job's status, which carries every slide's summary, leaves them
        # out. Written whole: the API may serve it meanwhile.
        folder = plan.store.path.parent
        written = {
            **summary.model_dump(mode="json"),
            "reader_reason": plan.slide.reader_reason,
            "reader_notes": list(plan.slide.reader_notes),
            "levels": [asdict(level) for level in plan.slide.levels],
            "regions": {
                "file": REGIONS_FILE,
                "count": len(regions),
                "threshold": self.wsi.region_threshold,
                "min_area_um2": self.wsi.region_min_area_um2,
                "area_mm2": round(sum(region.area_um2 for region in regions) / 1e6, 4),
            },
            "probability_map": dicom.probability_map is not None,
            "frame_of_reference": dicom.frame_of_reference,
            "files": sorted(
                name
                for name in (
                    "heatmap.zarr",
                    "overlay.png",
                    "tissue.png",
                    "tiles.geojson",
                    REGIONS_FILE,
                    ANNOTATIONS_FILE,
                    PROBABILITY_MAP_FILE,
                    "summary.json",
                )
                if name == "summary.json" or (folder / name).exists()
            ),
        }
        write_atomic(plan.store.path.parent / "summary.json", json.dumps(written, indent=1))
        return summary

    def _write_dicom(self, folder: Path, plan: _SlidePlan, regions: list[TumourRegion]) -> _DicomResults:
        """The slide's DICOM results beside its heatmap (0600), when it has classified tiles: on a DICOM slide, the
        tiles and regions as Microscopy Bulk Simple Annotations of its image and the heatmap as a Parametric Map on
        its frame of reference (a new one where the slide has none); on another slide, the Parametric Map alone, on
        a new frame of reference, its source a description of the slide."""
        heatmap, extent = plan.heatmap, plan.grid.tile_extent_level0
        annotations_path, map_path = folder / ANNOTATIONS_FILE, folder / PROBABILITY_MAP_FILE
        if not np.isfinite(heatmap).any():
            annotations_path.unlink(missing_ok=True)  # a resumed job's stale ones
            map_path.unlink(missing_ok=True)
            return _DicomResults(None, None, None, on_slide=False)
        source = plan.slide.dicom_source()
        if source is None:
            annotations_path.unlink(missing_ok=True)
            level0 = plan.slide.levels[0]
            described = described_slide(width=level0.width, height=level0.height, mpp=level0.mpp)
            parametric_map = probability_map(heatmap, tile_extent_level0=extent, source=described, spec=self.spec)
            _save_dicom(parametric_map, map_path)
            return _DicomResults(None, parametric_map, "new: the slide is not DICOM", on_slide=False)
        reference, own_frame = reference_image(source)
        annotations = slide_annotations(
            heatmap,
            regions,
            tile_extent_level0=extent,
            source=reference,
            spec=self.spec,
            threshold=self.wsi.region_threshold,
        )
        parametric_map = probability_map(heatmap, tile_extent_level0=extent, source=reference, spec=self.spec)
        _save_dicom(annotations, annotations_path)
        _save_dicom(parametric_map, map_path)
        frame = "the slide's" if own_frame else "new: the slide has none"
        return _DicomResults(annotations, parametric_map, frame, on_slide=True)

    def _store(self, datasets: list[pydicom.Dataset]) -> PacsStoreOutcome:
        """``datasets`` stored to the job's ``store_to`` PACS (its tenancy checked at submission); a failure is
        the outcome's, not the slide's: the files stay beside the heatmap."""
        name = self.status.store_to
        assert name is not None
        pacs = PacsClient(name, self.config.pacs[name])
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        try:
            attempts = pacs.store(datasets)
        except PacsFailed as failure:
            return PacsStoreOutcome(pacs=name, stored=False, attempts=0, sop_instance_uids=uids, reason=failure.reason)
        finally:
            pacs.session.close()
        return PacsStoreOutcome(pacs=name, stored=True, attempts=attempts, sop_instance_uids=uids)

    def _count_planned(self) -> None:
        self.status.tiles_total = sum(s.tiles_total or 0 for s in self.status.slides)
        self.status.tiles_done = sum(s.tiles_done for s in self.status.slides)  # a resumed job's head start
        self.metrics.total_tiles = self.status.tiles_total
        self.save(force=True)

    def _tiles_finished(self, tiles: int) -> None:
        now = time.monotonic()
        self.status.tiles_done = sum(s.tiles_done for s in self.status.slides)
        self.metrics.tiles_done(tiles)  # counts this run's own tiles: what its speed is measured on
        self._speed.append((now, self.metrics.done))
        while len(self._speed) > 2 and now - self._speed[0][0] > _SPEED_WINDOW_S:
            self._speed.popleft()
        (t0, done0), (t1, done1) = self._speed[0], self._speed[-1]
        self.status.tiles_per_s = round((done1 - done0) / (t1 - t0), 1) if t1 > t0 else 0.0
        left = self.status.tiles_total - self.status.tiles_done
        speed = self.status.tiles_per_s
        self.status.eta_s = round(left / speed, 1) if self.status.planned and speed > 0 else None
        self.save()

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._saved_at >= _SAVE_EVERY_S:
            self._saved_at = now
            self.records.save(self.status)


def _tile_counts(heatmap: np.ndarray, grid: TileGrid) -> tuple[int, int, float]:
    """A heatmap's classified (tissue) tiles, its positive ones, and a tile's area in mm²."""
    classified = ~np.isnan(heatmap)
    positive = int((heatmap[classified] >= _POSITIVE).sum())
    return int(classified.sum()), positive, (grid.tile_size * grid.mpp / 1000.0) ** 2


def _on_grid(heatmap: np.ndarray, grid: TileGrid, onto: TileGrid) -> np.ndarray:
    """``heatmap`` (of ``grid``) on the tiles of ``onto``, another grid over the same slide: each tile takes the value
    of the tile its centre falls in (NaN beyond ``grid``)."""
    if grid.shape == onto.shape and grid.tile_extent_level0 == onto.tile_extent_level0:
        return heatmap
    ratio = onto.tile_extent_level0 / grid.tile_extent_level0
    rows = np.floor((np.arange(onto.rows) + 0.5) * ratio).astype(int)
    cols = np.floor((np.arange(onto.cols) + 0.5) * ratio).astype(int)
    on_grid = np.full(onto.shape, np.nan, np.float32)
    inside_rows, inside_cols = rows < grid.rows, cols < grid.cols
    on_grid[np.ix_(inside_rows, inside_cols)] = heatmap[np.ix_(rows[inside_rows], cols[inside_cols])]
    return on_grid


def _ended(slide: SlideStatus) -> bool:
    return slide.state in (SlideState.done, SlideState.failed, SlideState.cancelled)


def _reason(error: BaseException) -> str:
    """A slide's error for its status: what went wrong, never a path or a patient field."""
    if isinstance(error, RequestError):
        return error.reason
    if isinstance(error, SlideFailed):
        return str(error)
    if isinstance(error, OSError):
        return f"cannot read the slide ({error.strerror or type(error).__name__})"
    return str(error)  # ValueError: HeatmapStore's "the out folder holds another slide's heatmap" and the like
