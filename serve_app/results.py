"""Results on shared storage, so that any ingress replica serves any result until it expires."""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.config import StorageConfig
from serve_app.errors import ResultNotFound
from serve_app.studies.volume import box_slices, shifted_affine

_RESULT_ID = re.compile(r"^[0-9a-f]{32}$")
MASK_FILE = "mask.nii.gz"
# Only the box that holds the foreground is written with the result, uncompressed: the whole mask is
# built and gzipped on its first download. A full-size CT mask is 78 MB of mostly zeros, and writing
# it cost more than the GPU spends segmenting the study; many clients only want the volumes.
_BOX_FILE = "mask-box.nii"
_GRID_FILE = "grid.json"
SUMMARY_FILE = "result.json"
_SWEEP_INTERVAL_S = 600
OWNER_FILE = "tenant"  # the tenant that made the result: only it may read the result


class ResultStore:
    def __init__(self, root: Path, retention_hours: float):
        self.root = Path(root)
        self.retention_s = retention_hours * 3600
        self.root.mkdir(parents=True, exist_ok=True)
        self._next_sweep = 0.0

    @classmethod
    def of(cls, storage: StorageConfig) -> ResultStore:
        return cls(storage.results, storage.result_retention_hours)

    def save(
        self,
        result_id: str,
        box: np.ndarray,
        box_start: Sequence[int],
        grid_shape: Sequence[int],
        affine: np.ndarray,
        summary: dict,
    ) -> None:
        """Store a result: ``box`` holds the mask's labels from voxel ``box_start`` of a grid of
        ``grid_shape`` with ``affine``; outside it the mask is 0."""
        # Expired results are already unreadable (_existing checks their age); deleting them needs a
        # scan of every result, so it runs once in a while rather than on every request's hot path.
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + _SWEEP_INTERVAL_S
            self.sweep()
        folder = self._folder(result_id)
        # Written under a temporary name and renamed, so a reader never sees half a result.
        partial = folder.with_name(folder.name + ".partial")
        partial.mkdir(parents=True)
        affine = np.asarray(affine, dtype=float)
        nib.save(nib.Nifti1Image(box.astype(np.uint8), shifted_affine(affine, box_start)), str(partial / _BOX_FILE))
        grid = {
            "shape": [int(n) for n in grid_shape],
            "affine": affine.tolist(),
            "box_start": [int(a) for a in box_start],
        }
        (partial / _GRID_FILE).write_text(json.dumps(grid))
        (partial / SUMMARY_FILE).write_text(json.dumps(summary))
        partial.rename(folder)

    def set_owner(self, result_id: str, tenant_id: str) -> None:
        (self._folder(result_id) / OWNER_FILE).write_text(tenant_id)

    def summary(self, result_id: str, tenant_id: str) -> dict:
        return json.loads(self._existing(result_id, SUMMARY_FILE, tenant_id).read_text())

    def mask_path(self, result_id: str, tenant_id: str) -> Path:
        """The gzipped mask on the study's whole grid, built now if this is its first download."""
        summary = self._existing(result_id, SUMMARY_FILE, tenant_id)
        gz = summary.with_name(MASK_FILE)
        if not gz.exists():
            grid = json.loads(summary.with_name(_GRID_FILE).read_text())
            box = np.asanyarray(nib.load(summary.with_name(_BOX_FILE)).dataobj)
            mask = np.zeros(grid["shape"], np.uint8)
            mask[box_slices(grid["box_start"], box.shape)] = box
            # Renamed into place: a concurrent download sees the whole file or none.
            partial = gz.with_name(f"{uuid.uuid4().hex}.nii.gz")
            nib.save(nib.Nifti1Image(mask, np.asarray(grid["affine"])), str(partial))
            partial.rename(gz)
        return gz

    def sweep(self) -> None:
        """Delete results older than the retention period."""
        cutoff = time.time() - self.retention_s
        for folder in self.root.iterdir():
            try:
                expired = folder.stat().st_mtime < cutoff
            except FileNotFoundError:  # a concurrent save renamed its .partial folder, or another sweep won
                continue
            if expired:
                shutil.rmtree(folder, ignore_errors=True)

    def _folder(self, result_id: str) -> Path:
        if not _RESULT_ID.match(result_id):
            raise ResultNotFound("no such result")
        return self.root / result_id

    def _existing(self, result_id: str, name: str, tenant_id: str) -> Path:
        path = self._folder(result_id) / name
        owner = path.with_name(OWNER_FILE)
        # Another tenant's result is "not found", not "forbidden": its existence is not theirs to learn.
        mine = owner.is_file() and owner.read_text() == tenant_id
        if not mine or not path.is_file() or path.stat().st_mtime < time.time() - self.retention_s:
            raise ResultNotFound("no such result, or it has expired")
        return path
