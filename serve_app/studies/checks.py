"""Checks that a study is a real image, made where a study is read, so that a degenerate header or voxel is a 422
naming what is wrong rather than a failure (or a silent 0 mL) deep inside MONAI's transforms.

A gantry tilt (slices stepping off their normal) is a real grid and passes; what fails is spacing that is
zero, negative or not a number, direction cosines that are not unit length or not orthogonal, and an
affine that cannot be inverted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serve_app.errors import InvalidStudy
from serve_app.studies.volume import Affine

__all__ = ["check_affine", "check_direction_cosines", "check_finite_voxels", "check_pixel_spacing", "finite_numbers"]

# DICOM writes cosines as decimal strings: six digits are common, and scanners round more coarsely.
_COSINE_TOLERANCE = 1e-2
# No scanner's voxel is below a micron or above a metre; outside that, volumes in mL overflow or vanish in float64.
_MIN_SPACING_MM, _MAX_SPACING_MM = 1e-3, 1e3
# An affine this ill-conditioned maps voxels onto (nearly) a plane: no resampling can undo it.
_MAX_CONDITION = 1e6


def finite_numbers(values, count: int, tag: str) -> np.ndarray:
    """``values`` (a DICOM multi-value) as ``count`` finite float64s; 422 naming ``tag`` otherwise."""
    try:
        numbers = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidStudy(f"{tag} holds a value that is not a number") from None
    if numbers.shape != (count,):
        raise InvalidStudy(f"{tag} has {numbers.size} values; {count} are needed")
    if not np.isfinite(numbers).all():
        raise InvalidStudy(f"{tag} holds a value that is not finite (NaN or infinity)")
    return numbers


def check_pixel_spacing(spacing: Sequence[float]) -> None:
    """Row and column spacing in mm must be positive."""
    if min(spacing) <= 0:
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise InvalidStudy(f"PixelSpacing is {shown} mm; spacing must be positive")


def check_direction_cosines(row: np.ndarray, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ImageOrientationPatient's row and column directions, made exactly unit length.

    They must be unit vectors and orthogonal, within what rounding in a header explains.
    """
    for name, vector in (("row", row), ("column", column)):
        norm = float(np.linalg.norm(vector))
        if abs(norm - 1) > _COSINE_TOLERANCE:
            raise InvalidStudy(f"ImageOrientationPatient's {name} direction has length {norm:.3g}; it must be 1")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    dot = float(np.dot(row, column))
    if abs(dot) > _COSINE_TOLERANCE:
        raise InvalidStudy(
            f"ImageOrientationPatient's row and column directions are not orthogonal (dot product {dot:.3g})"
        )
    return row, column


def check_affine(affine: Affine, source: str) -> None:
    """A (4, 4) voxel -> RAS mm affine must be finite, with non-zero spacing along every axis, and invertible.

    Args:
        affine: the study's affine.
        source: what it came from, for the message (``"the NIfTI image's affine"``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InvalidStudy(f"{source} holds values that are not finite (NaN or infinity)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing == 0).any():
        axis = int(np.flatnonzero(spacing == 0)[0])
        raise InvalidStudy(f"{source} has a zero column {axis}: voxel spacing along axis {axis} is 0")
    outside = (spacing < _MIN_SPACING_MM) | (spacing > _MAX_SPACING_MM)
    if outside.any():
        axis = int(np.flatnonzero(outside)[0])
        raise InvalidStudy(
            f"{source} gives a voxel spacing of {spacing[axis]:.3g} mm along axis {axis}; "
            f"it must be between {_MIN_SPACING_MM:g} and {_MAX_SPACING_MM:g} mm"
        )
    condition = np.linalg.cond(affine[:3, :3] / spacing)  # of the directions alone, whatever the spacing
    if not condition < _MAX_CONDITION:
        raise InvalidStudy(f"{source} cannot be inverted: its axes are (nearly) parallel")


def check_finite_voxels(array: np.ndarray, source: str) -> None:
    """Float voxels must all be finite: a NaN would spread through resampling and vanish from every volume."""
    if array.dtype.kind == "f":
        non_finite = array.size - int(np.count_nonzero(np.isfinite(array)))
        if non_finite:
            raise InvalidStudy(f"{source} has {non_finite} voxels that are not finite (NaN or infinity)")
