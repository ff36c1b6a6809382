"""The image a request carries between stages: voxels on a grid placed in patient space."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    from serve_app.studies.dicom_source import DicomSource

__all__ = ["LPS_TO_RAS", "Affine", "Volume", "box_slices", "shifted_affine", "spacing_of", "voxel_volume_ml"]

Affine: TypeAlias = np.ndarray
"""A (4, 4) float64 matrix from voxel indices to RAS millimetres (NIfTI's and MONAI's convention).

Which voxel grid it maps is said where it is used: ``grid_affine`` (the study's own image grid) or
``model_affine`` (the grid of the model's input, after preprocessing)."""

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM's patient frame (LPS: x to the patient's left, y to the back) onto RAS: x and y flipped; its own inverse."""


@dataclass
class Volume:
    """A 3D image indexed ``[i, j, k]`` with a RAS affine (voxel index -> mm), as NIfTI and MONAI use.

    For a DICOM series ``i`` runs along a row (columns), ``j`` down a column (rows) and
    ``k`` through the slices in patient order.
    """

    array: np.ndarray  # (I, J, K) voxels in modality units (HU for CT), as stored where torch has the type
    affine: Affine  # image voxel -> RAS mm
    modality: str | None = None
    # Kept for the audit trail's salted hash; never logged or returned as is.
    study_instance_uid: str | None = None
    # The DICOM instances the slices came from, for results that reference them; None for NIfTI.
    source: DicomSource | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.affine)

    def save_nifti(self, path: Path) -> None:
        """Write the image as NIfTI (gzipped where ``path`` ends in .gz) with its affine: the frame the mask is made
        on, so a viewer lays one over the other. Whole-numbered voxels that fit int16 (CT in HU) are written as
        int16: half of float32's bytes to send a browser."""
        array = self.array
        if array.dtype.kind == "f" and array.size:
            whole = np.array_equal(array, np.round(array))
            if whole and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
                array = array.astype(np.int16)
        nib.save(nib.Nifti1Image(array, np.asarray(self.affine, dtype=float)), str(path))


def spacing_of(affine: Affine) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def voxel_volume_ml(affine: Affine) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def shifted_affine(affine: Affine, start: Sequence[int]) -> Affine:
    """The affine of a box of the grid that begins at voxel ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(affine, dtype=float) @ shift


def box_slices(start: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of a box of ``shape`` that begins at voxel ``start``."""
    return tuple(slice(int(a), int(a) + int(n)) for a, n in zip(start, shape, strict=True))
