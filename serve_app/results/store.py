"""Results on shared storage, so that any ingress replica serves any result until it expires.

A result is written by the stage that makes it (postprocessing) and made readable by the request that asked for it
(the ingress): ``save`` stages it, ``commit`` gives it its tenant and puts it in place. A request that gives up
(its deadline passed, its client left) ``discard``s it instead, so a stage that could not be interrupted stores
nothing that nobody asked for.

A result's folder holds the mask's foreground box, its grid and summary, the model that made it and, for a DICOM
study, its source instances' headers. The whole NIfTI mask, and the DICOM SEG and SR, are built on first download:
many clients only want the volumes, and none of these should slow the request that makes the result.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import nibabel as nib
import numpy as np
import pydicom

from serve_app.config import StorageConfig
from serve_app.errors import CandidateNotDeliverable, ImageNotKept, NoDicomResult, ResultNotFound
from serve_app.model_repository import ModelSpec
from serve_app.results.dicom_seg import build_segmentation
from serve_app.results.dicom_sr import build_measurement_report
from serve_app.results.index import IndexEntry, ResultIndex, RolloutRole
from serve_app.results.measurements import LabelVolume
from serve_app.storage import private_folder
from serve_app.studies.dicom_source import DicomSource
from serve_app.studies.volume import box_slices, shifted_affine

__all__ = ["IMAGE_FILE", "MASK_FILE", "OWNER_FILE", "SEG_FILE", "SR_FILE", "SUMMARY_FILE", "ResultStore"]

_RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
MASK_FILE = "mask.nii.gz"
# Only the box that holds the foreground is written with the result, uncompressed: the whole mask is
# built and gzipped on its first download. A full-size CT mask is 78 MB of mostly zeros, and writing
# it cost more than the GPU spends segmenting the study; many clients only want the volumes.
_BOX_FILE = "mask-box.nii"
_GRID_FILE = "grid.json"
SUMMARY_FILE = "result.json"
_CREATED = "created"  # the summary's key of when the result was made (UTC, ISO 8601): its retention counts from then
_MODEL_FILE = "model.json"  # the model's spec as it was when it made the result: names and codes of the segments
_SOURCE_FILE = "source.json"  # the DICOM source's headers (DICOM JSON); absent for a NIfTI study
# The SEG and SR are built together into one folder, renamed into place: the SR references the SEG by its UID,
# so a download never pairs one build's SEG with another's SR.
_DICOM_FOLDER = "dicom"
SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"
# Beside a result's folder, under its id and a suffix: the folder being written, the whole result waiting for its
# request to commit it, and the mark of a request that gave up on it. A request commits or discards within
# moments of its result being staged, so any of these older than this was abandoned.
_ABANDONED_AFTER_S = 600
_PARTIAL = ".partial"
_STAGED = ".staged"
_DISCARDED = ".discarded"
OWNER_FILE = "tenant"  # the tenant that made the result: only it may read the result
_INDEXED_ALL = ".indexed-all"  # in the index: the results stored before it existed were indexed
_INDEXING_LOCK = ".indexing.lock"  # in the index: flocked by the one process indexing those results
# The study's image on the mask's grid, kept only when the request asked (keep_image): a viewer reopening the
# result shows the mask over it.
IMAGE_FILE = "image.nii.gz"
_NIFTI_STUDY = (
    "this result came from a NIfTI study: it has no source instances for a DICOM SEG or SR to reference; "
    f"download {MASK_FILE}"
)


class ResultStore:
    """Results under ``root``, each readable by its tenant for ``retention_hours`` from when it was made; ``sweep``
    deletes them then (``serve_app.retention.RetentionSweeper`` calls it on a timer).

    ``root`` is created 0700, and refused (``UnsafeStorage``) if another user owns it or others may write it. Beside
    it, ``<root>-index`` holds each tenant's results by the time they were made (``ResultIndex``), for the review
    worklist; results stored before the index existed are indexed in the background (``index_existing``).
    """

    def __init__(self, root: Path, retention_hours: float):
        self.root = private_folder(root)
        self.retention_s = retention_hours * 3600
        self.index = ResultIndex(self.root.with_name(f"{self.root.name}-index"))
        done = self.index.root / _INDEXED_ALL
        if not done.exists():
            with os.scandir(self.root) as entries:
                if next(entries, None) is None:  # no result at all, so none from before the index: all indexed
                    done.touch(mode=0o600)

    @classmethod
    def of(cls, storage: StorageConfig) -> ResultStore:
        """The results of ``storage``; its root and upload folder checked private as well (``private_folder``)."""
        private_folder(storage.root)
        private_folder(storage.uploads)
        return cls(storage.results, storage.result_retention_hours)

    def save(
        self,
        result_id: str,
        box: np.ndarray,
        box_start: Sequence[int],
        grid_shape: Sequence[int],
        affine: np.ndarray,
        summary: dict,
        spec: ModelSpec | None = None,
        source: DicomSource | None = None,
    ) -> None:
        """Store a result: ``box`` holds the mask's labels from voxel ``box_start`` of a grid of
        ``grid_shape`` with ``affine``; outside it the mask is 0.

        ``spec`` is the model that made it and ``source`` the DICOM instances of the grid's slices (None for a
        NIfTI study); with both, the result has a DICOM SEG and SR. The summary keeps the time it was made
        (``created``): its retention counts from then, whatever is added to its folder later.
        """
        folder = self._folder(result_id)
        # Written under a temporary name and renamed, so a reader never sees half a result. A save whose replica
        # died half-way left its partial folder: the request's second attempt (StageHandles) writes it anew.
        partial = _beside(folder, _PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        affine = np.asarray(affine, dtype=float)
        nib.save(nib.Nifti1Image(box.astype(np.uint8), shifted_affine(affine, box_start)), str(partial / _BOX_FILE))
        grid = {
            "shape": [int(n) for n in grid_shape],
            "affine": affine.tolist(),
            "box_start": [int(a) for a in box_start],
        }
        (partial / _GRID_FILE).write_text(json.dumps(grid))
        (partial / SUMMARY_FILE).write_text(json.dumps({**summary, _CREATED: datetime.now(UTC).isoformat()}))
        if spec is not None:
            (partial / _MODEL_FILE).write_text(spec.model_dump_json())
        if source is not None:
            source.save(partial / _SOURCE_FILE)
        staged = _beside(folder, _STAGED)
        # Either a first attempt finished before its replica died, answering no one (the same result), or the
        # request gave up while this stage worked. A request giving up between this check and the rename leaves a
        # staged result that the sweep deletes.
        if staged.exists() or folder.exists() or _beside(folder, _DISCARDED).exists():
            shutil.rmtree(partial)
            return
        partial.rename(staged)

    def commit(self, result_id: str, tenant_id: str, image: Path | None = None, rollout: dict | None = None) -> None:
        """Make the staged result readable by ``tenant_id``, with ``image`` (the study's gzipped NIfTI on the mask's
        grid, for a viewer) kept in it when given; ``image`` may be on another filesystem (uploads in RAM).
        ``rollout``: the result's part in a rollout of its model (``ResultRollout``'s fields), kept in its
        summary."""
        folder = self._folder(result_id)
        staged = _beside(folder, _STAGED)
        if image is not None:
            shutil.move(image, staged / IMAGE_FILE)
        if rollout is not None:
            summary = json.loads((staged / SUMMARY_FILE).read_text())
            (staged / SUMMARY_FILE).write_text(json.dumps({**summary, "rollout": rollout}))
        (staged / OWNER_FILE).write_text(tenant_id)
        # Indexed before it is readable: a committed result is never missing from its tenant's worklist (a reader
        # skips an entry whose result is not there yet, or no longer).
        self.index.add(tenant_id, _index_entry(result_id, staged))
        staged.rename(folder)

    def discard(self, result_id: str) -> None:
        """The request gave up on its result: delete what is staged, and mark it, so that a stage still writing
        it stores nothing."""
        folder = self._folder(result_id)
        _beside(folder, _DISCARDED).touch()
        shutil.rmtree(_beside(folder, _STAGED), ignore_errors=True)

    @contextmanager
    def discarded_if_cancelled(self, result_id: str) -> Iterator[None]:
        """Within the block, the result is being made for a request; the request cancelled there (its deadline
        passed, its client left) ``discard``s it, as a stage may still be making it. Any other error means no
        stage is: nothing was staged, nothing is marked.

        Usage::

            with results.discarded_if_cancelled(result_id):
                async with asyncio.timeout(deadline_s):
                    await stages.segment(spec, folder, result_id)
            results.commit(result_id, tenant_id)
        """
        try:
            yield
        except (asyncio.CancelledError, TimeoutError):
            self.discard(result_id)
            raise

    def summary(self, result_id: str, tenant_id: str) -> dict:
        """The summary the result was saved with."""
        summary = json.loads(self._existing(result_id, SUMMARY_FILE, tenant_id).read_text())
        summary.pop(_CREATED, None)
        return summary

    def made(self, result_id: str, tenant_id: str) -> datetime:
        """When the result was made (UTC)."""
        summary = self._existing(result_id, SUMMARY_FILE, tenant_id)
        created = json.loads(summary.read_text()).get(_CREATED)
        return datetime.fromisoformat(created) if created else datetime.fromtimestamp(summary.stat().st_mtime, UTC)

    def study_instance_uid(self, result_id: str, tenant_id: str) -> str | None:
        """The StudyInstanceUID of the result's source; None for a NIfTI study."""
        path = self.folder_of(result_id, tenant_id) / _SOURCE_FILE
        if not path.is_file():
            return None
        return str(DicomSource.load(path).instances[0].StudyInstanceUID)

    def folder_of(self, result_id: str, tenant_id: str) -> Path:
        """The folder of the tenant's unexpired result; ``ResultNotFound`` (404) for another tenant's or none."""
        return self._existing(result_id, SUMMARY_FILE, tenant_id).parent

    @property
    def index_complete(self) -> bool:
        """Whether every result is in the index: none was stored before it, or those were indexed since."""
        return (self.index.root / _INDEXED_ALL).exists()

    def index_existing(self) -> bool:
        """Index the results committed before the index existed (a storage root written by an earlier medserve),
        once: a mark in the index says it was done. It walks every result, so it runs in the background (the
        retention sweeper's thread), never in a request; one process at a time (a non-blocking ``flock``: another
        process indexing already, this one returns False and tries again at its next sweep). A process that dies
        half-way leaves no mark: the next one walks again, skipping what is indexed. Whether the index is complete."""
        done = self.index.root / _INDEXED_ALL
        if done.exists():
            return True
        lock = os.open(self.index.root / _INDEXING_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if done.exists():  # another process finished between the first look and the lock
                return True
            with os.scandir(self.root) as folders:
                for folder in folders:
                    owner = Path(folder.path) / OWNER_FILE
                    if not _RESULT_ID.match(folder.name):
                        continue
                    try:
                        tenant_id = owner.read_text()
                        entry = _index_entry(folder.name, Path(folder.path))
                    except (OSError, ValueError):  # not committed, deleted meanwhile, or unreadable: nothing to review
                        continue
                    if not self.index.has(tenant_id, entry):
                        self.index.add(tenant_id, entry)
            done.touch(mode=0o600)
            return True
        finally:
            os.close(lock)  # releases the flock

    def folders_of_tenant(self, tenant_id: str) -> list[Path]:
        """The folders of every unexpired result of the tenant."""
        folders = []
        for folder in self.root.iterdir():
            try:
                folders.append(self.folder_of(folder.name, tenant_id))
            except ResultNotFound:  # another tenant's, expired, or a .partial folder being written
                continue
        return folders

    def model_of(self, result_id: str, tenant_id: str) -> ModelSpec | None:
        """The model that made the result, as it was then; None for a result stored without it."""
        path = self.folder_of(result_id, tenant_id) / _MODEL_FILE
        return ModelSpec.model_validate_json(path.read_text()) if path.is_file() else None

    def has_image(self, result_id: str, tenant_id: str) -> bool:
        """Whether the study's image was kept with the result."""
        return (self.folder_of(result_id, tenant_id) / IMAGE_FILE).is_file()

    def image_path(self, result_id: str, tenant_id: str) -> Path:
        """The study's image kept with the result; ``ImageNotKept`` (404) when the request did not ask for it."""
        path = self.folder_of(result_id, tenant_id) / IMAGE_FILE
        if not path.is_file():
            raise ImageNotKept(
                "the study's image was not kept with this result: segment with ?keep_image=true to keep it"
            )
        return path

    def mask_path(self, result_id: str, tenant_id: str) -> Path:
        """The gzipped mask on the study's whole grid, built now if this is its first download."""
        summary = self._existing(result_id, SUMMARY_FILE, tenant_id)
        gz = summary.with_name(MASK_FILE)
        if not gz.exists():
            grid = json.loads(summary.with_name(_GRID_FILE).read_text())
            # Renamed into place: a concurrent download sees the whole file or none.
            partial = gz.with_name(f"{uuid.uuid4().hex}.nii.gz")
            nib.save(nib.Nifti1Image(self._whole_mask(summary.parent), np.asarray(grid["affine"])), str(partial))
            partial.rename(gz)
        return gz

    def has_dicom_results(self, result_id: str, tenant_id: str) -> bool:
        """Whether the result has a DICOM SEG and SR: whether its study was DICOM."""
        summary = self._existing(result_id, SUMMARY_FILE, tenant_id)
        return summary.with_name(_SOURCE_FILE).is_file() and summary.with_name(_MODEL_FILE).is_file()

    def seg_path(self, result_id: str, tenant_id: str) -> Path:
        """The result's DICOM Segmentation, built now (with the SR) if this is the first download of either.

        Raises ``NoDicomResult`` (404) for a result of a NIfTI study.
        """
        return self._dicom_folder(result_id, tenant_id) / SEG_FILE

    def sr_path(self, result_id: str, tenant_id: str) -> Path:
        """The result's TID 1500 Structured Report, which references the SEG; built as ``seg_path`` says."""
        return self._dicom_folder(result_id, tenant_id) / SR_FILE

    def dicom_results(self, result_id: str, tenant_id: str) -> list[pydicom.Dataset]:
        """The SEG and the SR, in that order (a PACS that checks references receives the SEG first), to send to a
        PACS. ``CandidateNotDeliverable`` (409) for a shadow result: a candidate's run is kept for review only."""
        rollout = self.summary(result_id, tenant_id).get("rollout") or {}
        if rollout.get("role") == "shadow":
            raise CandidateNotDeliverable(
                f"result {result_id} is a shadow run of candidate version {rollout.get('version')}: it is kept for "
                "review and is never sent to a PACS"
            )
        folder = self._dicom_folder(result_id, tenant_id)
        return [pydicom.dcmread(folder / SEG_FILE), pydicom.dcmread(folder / SR_FILE)]

    def sweep(self) -> None:
        """Delete results past the retention period, judged by when each was made (a review written into its
        folder does not keep it), and what was left of abandoned ones."""
        now = time.time()
        for path in self.root.iterdir():
            try:
                if _RESULT_ID.match(path.name):
                    expired = self._expired(path, now)
                else:  # partial, staged or discarded: its folder's time is when it was written
                    expired = path.stat().st_mtime < now - _ABANDONED_AFTER_S
            except FileNotFoundError:  # a concurrent save renamed its .partial folder, or another sweep won
                continue
            if expired and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif expired:
                path.unlink(missing_ok=True)
        self.index.sweep(datetime.fromtimestamp(now - self.retention_s, UTC))

    def whole_mask(self, result_id: str, tenant_id: str) -> np.ndarray:
        """The tenant's result's (I, J, K) uint8 mask on the study's whole grid."""
        return self._whole_mask(self.folder_of(result_id, tenant_id))

    def _folder(self, result_id: str) -> Path:
        if not _RESULT_ID.match(result_id):
            raise ResultNotFound("no such result")
        return self.root / result_id

    def _existing(self, result_id: str, name: str, tenant_id: str) -> Path:
        path = self._folder(result_id) / name
        owner = path.with_name(OWNER_FILE)
        # Another tenant's result is "not found", not "forbidden": its existence is not theirs to learn.
        mine = owner.is_file() and owner.read_text() == tenant_id
        if not mine or not path.is_file() or self._expired(path.parent, time.time()):
            raise ResultNotFound("no such result, or it has expired")
        return path

    def _expired(self, folder: Path, now: float) -> bool:
        """Whether the result in ``folder`` was made longer than the retention period before ``now``."""
        summary = folder / SUMMARY_FILE
        try:
            created = json.loads(summary.read_text()).get(_CREATED)
        except ValueError:
            created = None
        # A summary without the time (stored by an earlier medserve, or unreadable): its file, written once and
        # never rewritten, says when.
        made = datetime.fromisoformat(created).timestamp() if created else summary.stat().st_mtime
        return made < now - self.retention_s

    def _whole_mask(self, folder: Path) -> np.ndarray:
        """The (I, J, K) uint8 mask on the study's whole grid, from its stored box."""
        grid = json.loads((folder / _GRID_FILE).read_text())
        box = np.asanyarray(nib.load(folder / _BOX_FILE).dataobj)
        mask = np.zeros(grid["shape"], np.uint8)
        mask[box_slices(grid["box_start"], box.shape)] = box
        return mask

    def _dicom_folder(self, result_id: str, tenant_id: str) -> Path:
        """The folder of the result's SEG and SR, built now if absent."""
        if not self.has_dicom_results(result_id, tenant_id):
            raise NoDicomResult(_NIFTI_STUDY)
        folder = self._folder(result_id)
        built = folder / _DICOM_FOLDER
        if built.is_dir():
            return built
        partial = folder / f"{uuid.uuid4().hex}.{_DICOM_FOLDER}.partial"
        partial.mkdir()
        try:
            spec = ModelSpec.model_validate_json((folder / _MODEL_FILE).read_text())
            source = DicomSource.load(folder / _SOURCE_FILE)
            segmentation = build_segmentation(self._whole_mask(folder), source, spec)
            segmentation.save_as(partial / SEG_FILE)
            volumes = [LabelVolume(**label) for label in json.loads((folder / SUMMARY_FILE).read_text())["labels"]]
            build_measurement_report(segmentation, volumes, source, spec).save_as(partial / SR_FILE)
            partial.rename(built)
        except OSError:
            if not built.is_dir():
                raise
            # A concurrent download built them first (a folder is not renamed over another): theirs are served.
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return built


def _index_entry(result_id: str, folder: Path) -> IndexEntry:
    """What the index keeps of the result in ``folder``: when it was made, its model and version, and its part in a
    rollout (the summary's ``rollout``, when the result was made in one)."""
    summary_file = folder / SUMMARY_FILE
    summary = json.loads(summary_file.read_text())
    created = summary.get(_CREATED)
    made = datetime.fromisoformat(created) if created else datetime.fromtimestamp(summary_file.stat().st_mtime, UTC)
    rollout = summary.get("rollout")
    rollout = rollout if isinstance(rollout, dict) and rollout.get("role") in get_args(RolloutRole) else {}
    model_file = folder / _MODEL_FILE
    model = json.loads(model_file.read_text()) if model_file.is_file() else {}
    return IndexEntry(
        result_id=result_id,
        created_at=made,
        model=model.get("name"),
        version=model.get("version") or rollout.get("version"),
        role=rollout.get("role"),
        paired_result_id=rollout.get("paired_result_id"),
    )


def _beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)
