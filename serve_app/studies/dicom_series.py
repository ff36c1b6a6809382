"""Read one DICOM image series into a ``Volume`` with pydicom.

Slices are ordered by their position along the slice normal (not by file name or
InstanceNumber), pixel values are rescaled to modality units (HU for CT), and the
grid's spacing, origin and direction come from the headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.studies.volume import Volume

_DICOMDIR = "1.2.840.10008.1.3.10"
_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
# Relative spread of slice steps tolerated before the series is called uneven (rounding in headers).
_STEP_TOLERANCE = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_dicom_series(paths: list[Path], limits: LimitsConfig) -> Volume:
    headers = [h for h in (_read_header(p) for p in paths) if h is not None]
    if not headers:
        raise InvalidStudy("the upload holds no DICOM images")
    _check_one_series(headers)
    rows, cols, n = int(headers[0].Rows), int(headers[0].Columns), len(headers)
    if rows * cols * n > limits.max_volume_voxels:
        raise PayloadTooLarge(
            f"the series has {rows}x{cols}x{n} voxels, over this server's limit of {limits.max_volume_voxels}"
        )
    row_dir, col_dir = _direction_cosines(headers[0])
    normal = np.cross(row_dir, col_dir)
    order = np.argsort([float(np.dot(h.ImagePositionPatient, normal)) for h in headers])
    headers = [headers[i] for i in order]
    step = _slice_step(headers, normal)

    array = np.empty((cols, rows, n), dtype=np.float32)
    for k, header in enumerate(headers):
        array[:, :, k] = _read_pixels(header.filename).T

    row_spacing, col_spacing = (float(s) for s in headers[0].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = np.asarray(headers[0].ImagePositionPatient, dtype=float)
    first = headers[0]
    return Volume(
        array=array,
        affine=_LPS_TO_RAS @ affine_lps,
        modality=str(first.get("Modality", "")) or None,
        study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
    )


def _read_header(path: Path):
    try:
        # defer_size keeps pixel data on disk while telling us whether it is there.
        ds = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError, ValueError, OSError):
        raise InvalidStudy("a DICOM file is truncated or unreadable") from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
        return None
    return ds


def _check_one_series(headers) -> None:
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise InvalidStudy(f"the upload holds slices of {len(series)} different series; send one series per request")
    for h in headers:
        if "PixelData" not in h:
            raise InvalidStudy("a DICOM file of the series has no pixel data")
        missing = [tag for tag in _REQUIRED if tag not in h]
        if missing:
            raise InvalidStudy(f"a DICOM image lacks {', '.join(missing)}")
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidStudy("multi-frame DICOM images are not supported; send one file per slice")
    sizes = sorted({(int(h.Rows), int(h.Columns)) for h in headers})
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sizes[:2])
        raise InvalidStudy(f"the slices have different sizes ({shown}); a series has one size")
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise InvalidStudy("the slices have different orientations (ImageOrientationPatient)")


def _direction_cosines(header) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
    return iop[:3], iop[3:]


def _slice_step(headers, normal: np.ndarray) -> np.ndarray:
    """The vector from one slice's origin to the next's."""
    if len(headers) == 1:
        h = headers[0]
        thickness = float(h.get("SpacingBetweenSlices") or h.get("SliceThickness") or 1.0)
        return normal * thickness
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise InvalidStudy("two slices of the series share one position")
    if steps.max() - steps.min() > _STEP_TOLERANCE * steps.mean():
        raise InvalidStudy(
            f"the slice spacing is uneven ({steps.min():.2f} to {steps.max():.2f} mm): a slice is missing or the series is mixed"
        )
    return (positions[-1] - positions[0]) / (len(headers) - 1)


def _read_pixels(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    try:
        return apply_rescale(ds.pixel_array, ds)
    except Exception as e:  # pydicom raises many types for pixel data it cannot decode
        syntax = ds.file_meta.get("TransferSyntaxUID")
        raise InvalidStudy(f"the pixel data cannot be decoded (transfer syntax {getattr(syntax, 'name', 'unknown')})") from e
