"""Read one DICOM image series into a ``Volume`` with pydicom.

Slices are ordered by their position along the slice normal (not by file name or
InstanceNumber), pixel values are rescaled to modality units (HU for CT), and the
grid's spacing, origin and direction come from the headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.studies.checks import (
    check_affine,
    check_direction_cosines,
    check_finite_voxels,
    check_pixel_spacing,
    finite_numbers,
)
from serve_app.studies.volume import Volume

__all__ = ["read_dicom_series"]

_DICOMDIR = "1.2.840.10008.1.3.10"
_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
# What is read of each slice's header, and of its pixel module besides what pydicom's decoder reads itself.
_HEADER_ELEMENTS = (
    *_REQUIRED,
    "SeriesInstanceUID",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "SpacingBetweenSlices",
    "SliceThickness",
    "Modality",
    "StudyInstanceUID",
)
_RESCALE_ELEMENTS = ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept")
# Relative spread of slice steps tolerated before the series is called uneven (rounding in headers).
_STEP_TOLERANCE = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Grey-scale: one sample a pixel. MONOCHROME1 displays inverted, but its rescaled values are the same units.
_GREY_SCALE = ("MONOCHROME1", "MONOCHROME2")


def read_dicom_series(paths: list[Path], limits: LimitsConfig) -> Volume:
    """One DICOM image series as a ``Volume``: (columns, rows, slices) in modality units, RAS affine.

    Raises ``InvalidStudy`` (422) for anything that is not one grey-scale series on a real grid, and
    ``PayloadTooLarge`` (413) for one over ``limits.max_volume_voxels``, judged from headers alone.
    """
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
    positions = {id(h): _numbers(h, "ImagePositionPatient", 3) for h in headers}
    headers.sort(key=lambda h: float(np.dot(positions[id(h)], normal)))
    step = _slice_step([positions[id(h)] for h in headers], normal, headers[0])
    row_spacing, col_spacing = _numbers(headers[0], "PixelSpacing", 2)
    check_pixel_spacing((row_spacing, col_spacing))

    array = np.empty((cols, rows, n), dtype=np.float32)
    for k, header in enumerate(headers):
        array[:, :, k] = _read_pixels(header.filename, (rows, cols)).T
    check_finite_voxels(array, "the series")  # a huge RescaleSlope overflows float32

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[id(headers[0])]
    affine = _LPS_TO_RAS @ affine_lps
    check_affine(affine, "the series' geometry")
    first = headers[0]
    return Volume(
        array=array,
        affine=affine,
        modality=str(first.get("Modality", "")) or None,
        study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
    )


def _read_header(path: Path):
    ds = _read_file(path, defer_size=1024)  # pixel data left on disk, but whether it is there is known
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
        return None
    _decode(ds, _HEADER_ELEMENTS)
    return ds


def _read_file(path: Path | str, defer_size: int | None = None) -> pydicom.FileDataset:
    """``path`` as pydicom parses it; 422 for a file it cannot parse."""
    try:
        return pydicom.dcmread(path, defer_size=defer_size)
    except Exception:  # pydicom raises many types for a cut or corrupt file (struct.error, EOFError, ValueError, ...)
        raise InvalidStudy("a DICOM file is truncated or unreadable") from None


def _decode(ds, keywords: tuple[str, ...]) -> None:
    """Decode the values of ``keywords`` now, so that bytes pydicom cannot decode are a 422 naming the element:
    pydicom decodes a value when it is first read, and raises one of several types (for a US of 3 bytes, say)."""
    for keyword in keywords:
        try:
            ds.get(keyword)
        except Exception:
            raise InvalidStudy(f"a DICOM file's {keyword} cannot be decoded") from None


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
        if _integer(h, "NumberOfFrames", 1) > 1:
            raise InvalidStudy("multi-frame DICOM images are not supported; send one file per slice")
        _check_grey_scale(h)
    sizes = sorted({(_integer(h, "Rows"), _integer(h, "Columns")) for h in headers})
    empty = [(rows, cols) for rows, cols in sizes if min(rows, cols) < 1]
    if empty:
        rows, cols = empty[0]
        raise InvalidStudy(f"a slice has {rows} rows and {cols} columns; an image needs at least one of each")
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sizes[:2])
        raise InvalidStudy(f"the slices have different sizes ({shown}); a series has one size")
    orientations = np.array([_numbers(h, "ImageOrientationPatient", 6) for h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise InvalidStudy("the slices have different orientations (ImageOrientationPatient)")


def _integer(header, keyword: str, default: int | None = None) -> int:
    """An integer tag; 422 when it is absent (without a default) or not an integer."""
    value = header.get(keyword, default)
    try:
        return int(default if value in (None, "") else value)
    except (TypeError, ValueError):
        raise InvalidStudy(f"{keyword} is not an integer") from None


def _numbers(header, keyword: str, count: int, default: float | None = None) -> np.ndarray:
    """A numeric element's ``count`` values as finite float64s; 422 naming it otherwise.

    pydicom gives several values as a list, one bare, and an empty element as None.
    """
    value = header.get(keyword, default)
    values = list(value) if isinstance(value, MultiValue) else [] if value is None or value == "" else [value]
    return finite_numbers(values, count, keyword)


def _check_grey_scale(header) -> None:
    samples = _integer(header, "SamplesPerPixel", 1)
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))[:16]
    if samples != 1 or photometric not in _GREY_SCALE:
        raise InvalidStudy(
            f"the series is not grey-scale (SamplesPerPixel {samples}, PhotometricInterpretation {photometric}): "
            "CT and MR models take one value per voxel"
        )


def _direction_cosines(header) -> tuple[np.ndarray, np.ndarray]:
    iop = _numbers(header, "ImageOrientationPatient", 6)
    return check_direction_cosines(iop[:3], iop[3:])


def _slice_step(positions: list[np.ndarray], normal: np.ndarray, first) -> np.ndarray:
    """The vector from one slice's origin to the next's, given their positions in slice order."""
    if len(positions) == 1:
        # One slice: its thickness only scales volumes in mL, and headers omit it or get it wrong; 1 mm then.
        try:
            thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        except (TypeError, ValueError):
            thickness = 1.0
        return normal * (thickness if np.isfinite(thickness) and thickness > 0 else 1.0)
    positions = np.asarray(positions)
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-3):
        raise InvalidStudy("two slices of the series share one position")
    if steps.max() - steps.min() > _STEP_TOLERANCE * steps.mean():
        raise InvalidStudy(
            f"the slice spacing is uneven ({steps.min():.2f} to {steps.max():.2f} mm): "
            "a slice is missing or the series is mixed"
        )
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _read_pixels(path: str, shape: tuple[int, int]) -> np.ndarray:
    """One slice's (rows, columns) pixels in modality units."""
    ds = _read_file(path)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for pixel data it cannot decode
        syntax = ds.file_meta.get("TransferSyntaxUID")
        raise InvalidStudy(
            f"the pixel data cannot be decoded (transfer syntax {getattr(syntax, 'name', 'unknown')})"
        ) from e
    if pixels.shape != shape:
        raise InvalidStudy(f"a slice's pixel data decodes to shape {pixels.shape}, not its Rows x Columns {shape}")
    _decode(ds, _RESCALE_ELEMENTS)
    if "ModalityLUTSequence" in ds:
        try:
            return apply_rescale(pixels, ds)
        except Exception:  # a table that does not fit the pixels, or lies about its own length
            raise InvalidStudy("the slice's Modality LUT cannot be applied to its pixels") from None
    # Parsed here, not by pydicom: a header may hold text that is no number (and pydicom would multiply by it).
    slope = _numbers(ds, "RescaleSlope", 1, default=1)[0]
    intercept = _numbers(ds, "RescaleIntercept", 1, default=0)[0]
    if slope == 0:
        raise InvalidStudy("RescaleSlope is 0: every voxel would have one value")
    return pixels * slope + intercept if (slope, intercept) != (1, 0) else pixels
