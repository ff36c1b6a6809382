"""The image a request carries between stages: voxels on a grid placed in patient space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Volume:
    """A 3D image indexed ``[i, j, k]`` with a RAS affine (voxel index -> mm), as NIfTI and MONAI use.

    For a DICOM series ``i`` runs along a row (columns), ``j`` down a column (rows) and
    ``k`` through the slices in patient order.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: Optional[str] = None
    # Kept for the audit trail's salted hash; never logged or returned as is.
    study_instance_uid: Optional[str] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.affine)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def voxel_volume_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def shifted_affine(affine, start: Sequence[int]) -> np.ndarray:
    """The affine of a box of the grid that begins at voxel ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(affine, dtype=float) @ shift


def box_slices(start: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of a box of ``shape`` that begins at voxel ``start``."""
    return tuple(slice(int(a), int(a) + int(n)) for a, n in zip(start, shape))
