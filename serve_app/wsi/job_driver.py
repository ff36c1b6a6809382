"""WsiJobDriver: the Ray actor that runs one WSI job, from its slides to their heatmaps.

The path of a job, by file::

    serve_app/wsi/jobs.py         the API's side: check paths and quotas, write the record, start this actor
    serve_app/wsi/job_driver.py   this actor: plan each slide, send its work units, write what comes back
      serve_app/wsi/slides.py     open the slide with the reader for its format (readers/), its levels and mpp
      serve_app/wsi/tiling.py     the tile grid at the model's mpp
      serve_app/wsi/tissue.py     tissue detection on a low-resolution level: which tiles to classify
    deployments/tile_model.py     the tile model's replicas (Serve, autoscaled): read a unit, classify it
    serve_app/wsi/heatmaps.py     the Zarr heatmap, chunk by chunk, and its ledger of finished chunks
    serve_app/wsi/renderings.py   overlay PNG, tissue PNG, QuPath GeoJSON

Ray does the scheduling: the driver only keeps ``wsi.chunks_in_flight`` units sent to the model's
``TileModelDeployment``, whose autoscaling adds replicas while that backlog lasts and removes
them when it drains; several jobs share the replicas. A unit's probabilities are written to the heatmap
as soon as they come back, and recorded finished only then, so a job killed at any moment and submitted
again into the same ``out`` folder redoes nothing that was finished and ends with the same heatmap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppConfig
from serve_app.errors import RequestError, unwrap
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import TilePreprocessingSpec
from serve_app.observability.metrics import WsiJobMetrics
from serve_app.stopwatch import Stopwatch
from serve_app.storage import set_private_umask, write_atomic
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
from serve_app.wsi.renderings import write_overlay_png, write_tiles_geojson, write_tissue_png
from serve_app.wsi.slides import Slide, open_slide
from serve_app.wsi.tiling import TileGrid, plan_grid
from serve_app.wsi.tissue import TissueMask, detect_tissue
from serve_app.wsi.work_units import ChunkProbabilities, TileChunk

__all__ = ["DRIVER_NAMESPACE", "WsiJobDriver", "driver_name"]

logger = logging.getLogger(__name__)
DRIVER_NAMESPACE = "medserve-wsi"
_SAVE_EVERY_S = 0.5  # the record is rewritten at most this often while tiles finish
_SPEED_WINDOW_S = 10.0  # tiles/s is measured over this much recent time
_THUMBNAIL_SIDE = 2048
# Ray exports a worker's metrics every 10 s (metrics_report_interval_ms): a driver that exited at once
# would take its last counts with it.
_METRICS_FLUSH_S = 12.0


def driver_name(job_id: str) -> str:
    return f"wsi-job-{job_id}"


@dataclass
class _SlidePlan:
    """A slide opened and planned: its grid, its tissue, its heatmap store."""

    slide: Slide
    grid: TileGrid
    tissue: TissueMask
    tissue_tiles: np.ndarray  # (rows, cols) bool: the tiles to classify
    store: HeatmapStore
    seconds: PhaseSeconds
    units_total: int = 0  # work units holding tissue
    units_resumed: int = 0  # of those, finished by an earlier run into the same folder
    classify_wall_s: float = 0.0


class SlideFailed(Exception):
    """One slide cannot go on; its reason goes into its status, the job's other slides continue."""


@ray.remote(num_cpus=0)
class WsiJobDriver:
    """Runs one job (``run``), answers ``cancel``; made detached by ``serve_app.wsi.jobs``.

    Args:
        config: the application's config (``wsi``, the model repository, the Serve application name).
        status: the job's record as submitted; slides refused at submission are already ``failed``.
        slide_paths: each slide's checked real path, None for those refused.
        tile_model: the handle of the model's ``TileModelDeployment``.
    """

    def __init__(
        self, config: AppConfig, status: WsiJobStatus, slide_paths: list[str | None], tile_model: DeploymentHandle
    ):
        set_private_umask()  # the heatmaps, renderings and records it writes are the patient's: 0600, 0700
        self.config, self.wsi = config, config.wsi
        self.status, self.slide_paths = status, slide_paths
        self.spec = ModelRepository(config.model_repository).get(status.model, status.model_version)
        self.records = JobRecords(self.wsi.jobs)
        self.out = Path(status.out_path)
        self.tile_model = tile_model
        self.cancelled = False
        self.metrics = WsiJobMetrics(status.job_id, status.model, status.tenant)
        self._saved_at = 0.0
        self._speed: deque[tuple[float, int]] = deque()  # (time, tiles this run classified by then)

    async def run(self) -> None:
        self.status.state = JobState.running
        self._save(force=True)
        self.slide_slots = asyncio.Semaphore(self.wsi.slides_in_flight)
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
        self._save(force=True)
        self.metrics.finished(self.status.state.value)
        await asyncio.sleep(_METRICS_FLUSH_S)
        ray.actor.exit_actor()

    def cancel(self) -> None:
        """Send no more work units; those in flight finish and are kept, so the job can be resumed."""
        self.cancelled = True

    def _final_state(self) -> JobState:
        if self.cancelled:
            return JobState.cancelled
        if all(s.state is SlideState.failed for s in self.status.slides):
            return JobState.failed
        return JobState.done

    async def _run_slide(self, index: int) -> None:
        status = self.status.slides[index]
        async with self.slide_slots:
            if self.cancelled:
                status.state = SlideState.cancelled
                return
            status.state = SlideState.running
            self._save(force=True)
            plan = None
            try:
                plan = await asyncio.to_thread(self._plan, self.slide_paths[index], self.out / status.key)
                await self._classify_slide(status, plan)
                if self.cancelled:
                    status.state = SlideState.cancelled
                else:
                    status.summary = await asyncio.to_thread(self._write_outputs, plan)
                    status.state = SlideState.done
            except (SlideFailed, RequestError, OSError, ValueError) as e:
                status.state, status.error = SlideState.failed, _reason(e)
            finally:
                if plan is not None:
                    plan.slide.close()
            self._save(force=True)

    def _plan(self, path: str | None, folder: Path) -> _SlidePlan:
        """Open the slide, choose its level, find its tissue, open (or reopen) its heatmap: in a thread."""
        if path is None:
            raise SlideFailed("the slide was refused at submission")
        if not Path(path).is_file() and not Path(path).is_dir():  # a folder: a DICOM WSI's instances
            raise SlideFailed("no such file or folder (or not a regular file)")
        preprocessing = self.spec.preprocessing
        assert isinstance(preprocessing, TilePreprocessingSpec)
        watch = Stopwatch()
        slide = open_slide(path, mpp=self.status.mpp)
        try:
            grid = plan_grid(slide, tile_size=preprocessing.tile_size, mpp=preprocessing.mpp)
            open_s = watch.lap()
            tissue = detect_tissue(slide)
            tissue_tiles = tissue.tile_fractions(grid) >= self.wsi.min_tissue_fraction
            tissue_s = watch.lap()
            store = HeatmapStore.open(
                folder / "heatmap.zarr",
                rows=grid.rows,
                cols=grid.cols,
                chunk_tiles=self.wsi.chunk_tiles,
                attributes=self._heatmap_attributes(grid),
            )
        except BaseException:
            slide.close()
            raise
        return _SlidePlan(slide, grid, tissue, tissue_tiles, store, PhaseSeconds(open=open_s, tissue=tissue_s))

    def _heatmap_attributes(self, grid: TileGrid) -> dict:
        return {
            "model": self.spec.name,
            "model_version": self.spec.version,
            "level": grid.level.index,
            "level_mpp": grid.level.mpp,
            "tile_size": grid.tile_size,
            "mpp": grid.mpp,
            "scale": grid.scale,
            "tile_extent_level0": grid.tile_extent_level0,
            "label": self.spec.labels[1].name,
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

    async def _classify_unit(self, status: SlideStatus, plan: _SlidePlan, chunk_row: int, chunk_col: int) -> None:
        async with self.unit_slots:
            if self.cancelled or status.state is SlideState.failed:
                return
            chunk = TileChunk(
                slide_path=str(plan.slide.path),
                mpp=self.status.mpp,
                grid=plan.grid,
                chunk_row=chunk_row,
                chunk_col=chunk_col,
                chunk_tiles=self.wsi.chunk_tiles,
                tissue=self._tissue_of(plan, chunk_row, chunk_col),
            )
            result = await self._send(chunk)
        watch = Stopwatch()
        await asyncio.to_thread(plan.store.write_chunk, chunk_row, chunk_col, result.probabilities)
        plan.seconds.write += watch.lap()
        plan.seconds.read += result.read_s
        plan.seconds.inference += result.inference_s
        tiles = int(chunk.tissue.sum())
        status.tiles_done += tiles
        self._tiles_finished(tiles)

    async def _send(self, chunk: TileChunk) -> ChunkProbabilities:
        """One unit to a replica; again, up to ``wsi.chunk_attempts`` times, if its replica dies."""
        for attempt in range(1, self.wsi.chunk_attempts + 1):
            try:
                return await self.tile_model.classify.remote(chunk)
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

    def _write_outputs(self, plan: _SlidePlan) -> SlideSummary:
        """The heatmap's renderings and the slide's summary, beside the heatmap: in a thread."""
        watch = Stopwatch()
        folder = plan.store.path.parent
        heatmap = plan.store.read()
        grid = plan.grid
        thumbnail = plan.slide.thumbnail(_THUMBNAIL_SIDE)
        level0 = plan.slide.levels[0]
        per_level0 = thumbnail.shape[1] / level0.width  # thumbnail pixels per level-0 pixel
        extent = (grid.rows * grid.tile_extent_level0 * per_level0, grid.cols * grid.tile_extent_level0 * per_level0)
        write_overlay_png(folder / "overlay.png", thumbnail, heatmap, extent=extent)
        write_tissue_png(folder / "tissue.png", plan.tissue.mask, mpp=plan.tissue.mpp)
        write_tiles_geojson(folder / "tiles.geojson", heatmap, tile_extent_level0=grid.tile_extent_level0)
        plan.seconds.write += watch.lap()
        classified = ~np.isnan(heatmap)
        tissue = int(classified.sum())
        positive = int((heatmap[classified] >= 0.5).sum())
        tile_mm2 = (grid.tile_size * grid.mpp / 1000.0) ** 2
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
        )
        # summary.json adds why the reader was chosen, what it left out (other focal planes, optical paths) and the
        # pyramid levels the slide was read as; the job's status, which carries every slide's summary, leaves them
        # out. Written whole: the API may serve it meanwhile.
        written = {
            **summary.model_dump(mode="json"),
            "reader_reason": plan.slide.reader_reason,
            "reader_notes": list(plan.slide.reader_notes),
            "levels": [asdict(level) for level in plan.slide.levels],
        }
        write_atomic(folder / "summary.json", json.dumps(written, indent=1))
        return summary

    def _count_planned(self) -> None:
        self.status.tiles_total = sum(s.tiles_total or 0 for s in self.status.slides)
        self.status.tiles_done = sum(s.tiles_done for s in self.status.slides)  # a resumed job's head start
        self.metrics.total_tiles = self.status.tiles_total
        self._save(force=True)

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
        self._save()

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._saved_at >= _SAVE_EVERY_S:
            self._saved_at = now
            self.records.save(self.status)


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
