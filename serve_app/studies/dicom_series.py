"""Read one DICOM image series into a ``Volume`` with pydicom: a series of single-frame images, or one enhanced
(multi-frame) CT or MR image whose functional groups place each frame.

Each file is parsed once, its pixel data left on disk; the slices are ordered by their position along the slice
normal (not by file name, InstanceNumber or frame number) and the grid's spacing, origin and direction come from the
headers. Only then are the pixels decoded, one thread a core (numpy and the compressed-data decoders release the
GIL), and rescaled to modality units (HU for CT). Uncompressed little-endian integers are read straight from the file
offset the header pass found; everything else goes through pydicom's pixel-data plugins (``transfer_syntaxes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.studies.checks import (
    check_affine,
    check_direction_cosines,
    check_finite_voxels,
    check_pixel_spacing,
    finite_numbers,
)
from serve_app.studies.dicom_source import DicomSource, SourceFrame, without_pixels
from serve_app.studies.transfer_syntaxes import require_decoder
from serve_app.studies.volume import Volume

__all__ = ["read_dicom_series"]

_DICOMDIR = "1.2.840.10008.1.3.10"
_IMAGE_SIZE = ("Rows", "Columns")
_REQUIRED = (*_IMAGE_SIZE, "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
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
_PIXEL_DATA_TAG = 0x7FE00010
# Syntaxes whose pixel data is the stored values as they lie in memory on a little-endian host. Deflated data is
# little-endian too, but compressed as a whole: pydicom inflates it.
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Relative spread of slice steps tolerated before the series is called uneven (rounding in headers).
_STEP_TOLERANCE = 0.05
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Grey-scale: one sample a pixel. MONOCHROME1 displays inverted, but its rescaled values are the same units.
_GREY_SCALE = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class _Rescale:
    """How one slice's stored values become modality units: a Modality LUT, or a slope and an intercept."""

    slope: float
    intercept: float
    lut: pydicom.Dataset | None = None  # the dataset holding ModalityLUTSequence, applied by pydicom


@dataclass(frozen=True)
class _Slice:
    """One slice of the volume to decode: which file (and frame) holds it, and how it rescales."""

    header: pydicom.Dataset  # the header pass's dataset: pixel data left on disk, its offset known
    frame: int | None  # 0-based frame of a multi-frame image; None for a single-frame one
    rescale: _Rescale
    # What pydicom decodes when the values cannot be read straight from the file: the path of a single-frame
    # file, or the whole multi-frame dataset (read once, its frames then decoded in parallel).
    pydicom_source: pydicom.Dataset | str


def read_dicom_series(paths: list[Path], limits: LimitsConfig) -> Volume:
    """One DICOM image series as a ``Volume``: (columns, rows, slices) in modality units, RAS affine.

    ``paths`` hold either single-frame images of one series, or one multi-frame image whose frames are the slices.
    Raises ``UnsupportedMediaType`` (415) for pixel data in a transfer syntax no installed decoder reads (judged
    from the headers), ``InvalidStudy`` (422) for anything that is not one grey-scale series on a real grid, and
    ``PayloadTooLarge`` (413) for one over ``limits.max_volume_voxels``, judged from headers alone.
    """
    headers = [h for h in (_read_header(p) for p in paths) if h is not None]
    if not headers:
        raise InvalidStudy("the upload holds no DICOM images")
    _check_one_series(headers)
    if _integer(headers[0], "NumberOfFrames", 1) > 1:
        return _read_multi_frame(headers[0], limits)
    return _read_single_frames(headers, limits)


def _read_single_frames(headers: list[pydicom.Dataset], limits: LimitsConfig) -> Volume:
    """Single-frame images, one a slice; ``Volume.source`` lists them in slice order."""
    rows, cols, n = _integer(headers[0], "Rows"), _integer(headers[0], "Columns"), len(headers)
    _check_voxel_limit(rows, cols, n, limits)
    orientations = np.array([_numbers(h, "ImageOrientationPatient", 6) for h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise InvalidStudy("the slices have different orientations (ImageOrientationPatient)")
    row_dir, col_dir = check_direction_cosines(orientations[0][:3], orientations[0][3:])
    normal = np.cross(row_dir, col_dir)
    positions = {id(h): _numbers(h, "ImagePositionPatient", 3) for h in headers}
    headers.sort(key=lambda h: float(np.dot(positions[id(h)], normal)))
    step = _slice_step([positions[id(h)] for h in headers], normal, headers[0])
    row_spacing, col_spacing = _numbers(headers[0], "PixelSpacing", 2)
    check_pixel_spacing((row_spacing, col_spacing))

    slices = [_Slice(h, None, _rescale_of(h), h.filename) for h in headers]
    array = _decode_slices(slices, (rows, cols))
    affine = _affine(row_dir * col_spacing, col_dir * row_spacing, step, positions[id(headers[0])])
    return _volume(array, affine, headers[0], DicomSource.of_headers(headers))


def _read_multi_frame(header: pydicom.Dataset, limits: LimitsConfig) -> Volume:
    """An enhanced (or legacy-converted enhanced) multi-frame image whose frames are one stack of slices, placed
    by its Shared / Per-frame Functional Groups; ``Volume.source`` names each slice's frame."""
    frames = _integer(header, "NumberOfFrames")
    rows, cols = _integer(header, "Rows"), _integer(header, "Columns")
    _check_voxel_limit(rows, cols, frames, limits)
    groups = _frame_groups(header, frames)
    _check_one_stack(groups)
    planes = [_macro(g, "PlaneOrientationSequence", header) for g in groups]
    orientations = np.array([_numbers(plane, "ImageOrientationPatient", 6) for plane in planes])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise InvalidStudy("the frames have different orientations (PlaneOrientationSequence)")
    measures = [_macro(g, "PixelMeasuresSequence", header) for g in groups]
    spacings = np.array([_numbers(m, "PixelSpacing", 2) for m in measures])
    if not np.allclose(spacings, spacings[0], rtol=1e-3):
        raise InvalidStudy("the frames have different pixel spacings (PixelMeasuresSequence)")
    row_dir, col_dir = check_direction_cosines(orientations[0][:3], orientations[0][3:])
    normal = np.cross(row_dir, col_dir)
    positions = [_numbers(_macro(g, "PlanePositionSequence", header), "ImagePositionPatient", 3) for g in groups]
    order = sorted(range(frames), key=lambda i: float(np.dot(positions[i], normal)))
    step = _slice_step([positions[i] for i in order], normal, measures[0])
    row_spacing, col_spacing = spacings[0]
    check_pixel_spacing((row_spacing, col_spacing))

    # Uncompressed frames are read from the file where they lie; others decoded by pydicom from one full read of it.
    native = _native_values(header, 0, (rows, cols)) is not None
    pydicom_source = header if native else _read_file(header.filename)
    slices = [
        _Slice(header, i, _rescale_of(_macro(groups[i], "PixelValueTransformationSequence", header)), pydicom_source)
        for i in order
    ]
    array = _decode_slices(slices, (rows, cols))
    affine = _affine(row_dir * col_spacing, col_dir * row_spacing, step, positions[order[0]])
    source = DicomSource(instances=[without_pixels(header)], slices=[SourceFrame(0, i + 1) for i in order])
    return _volume(array, affine, header, source)


def _volume(array: np.ndarray, affine: np.ndarray, first: pydicom.Dataset, source: DicomSource) -> Volume:
    check_finite_voxels(array, "the series")  # a huge RescaleSlope overflows float32
    check_affine(affine, "the series' geometry")
    return Volume(
        array=array,
        affine=affine,
        modality=str(first.get("Modality", "")) or None,
        study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
        source=source,
    )


def _affine(column_step: np.ndarray, row_step: np.ndarray, slice_step: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The (4, 4) voxel -> RAS mm affine of a grid given in LPS: the steps along i (a row), j (a column), k."""
    affine_lps = np.eye(4)
    affine_lps[:3, :] = np.column_stack([column_step, row_step, slice_step, origin])
    return _LPS_TO_RAS @ affine_lps


def _check_voxel_limit(rows: int, cols: int, slices: int, limits: LimitsConfig) -> None:
    if rows * cols * slices > limits.max_volume_voxels:
        raise PayloadTooLarge(
            f"the series has {rows}x{cols}x{slices} voxels, over this server's limit of {limits.max_volume_voxels}"
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
    """One grey-scale series of images of one size, in transfer syntaxes this server decodes (else a 415)."""
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise InvalidStudy(f"the upload holds slices of {len(series)} different series; send one series per request")
    for h in headers:
        if "PixelData" not in h:
            raise InvalidStudy("a DICOM file of the series has no pixel data")
        multi_frame = _integer(h, "NumberOfFrames", 1) > 1
        if multi_frame and len(headers) > 1:
            raise InvalidStudy(
                "multi-frame DICOM images are not supported in an upload of several files; "
                "send one multi-frame image alone, or one file per slice"
            )
        _check_grey_scale(h)  # first: a colour image (a photo, a screenshot) often lacks the geometry too
        # A multi-frame image places its frames in functional groups, not in these top-level elements.
        missing = [tag for tag in (_IMAGE_SIZE if multi_frame else _REQUIRED) if tag not in h]
        if missing:
            raise InvalidStudy(f"a DICOM image lacks {', '.join(missing)}")
    for syntax in {str(h.file_meta.get("TransferSyntaxUID", "")) for h in headers} - {""}:
        require_decoder(syntax)  # a missing syntax is left to pydicom, whose failure to decode is a 422
    sizes = sorted({(_integer(h, "Rows"), _integer(h, "Columns")) for h in headers})
    empty = [(rows, cols) for rows, cols in sizes if min(rows, cols) < 1]
    if empty:
        rows, cols = empty[0]
        raise InvalidStudy(f"a slice has {rows} rows and {cols} columns; an image needs at least one of each")
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sizes[:2])
        raise InvalidStudy(f"the slices have different sizes ({shown}); a series has one size")


def _frame_groups(header, frames: int) -> list[tuple[pydicom.Dataset | None, pydicom.Dataset | None]]:
    """Each frame's (per-frame functional groups item, shared functional groups item)."""
    shared = _sequence(header, "SharedFunctionalGroupsSequence")
    per_frame = _sequence(header, "PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        raise InvalidStudy(
            "multi-frame DICOM images are not supported without functional groups (an enhanced CT or MR image "
            "has them); send one file per slice"
        )
    if per_frame and len(per_frame) != frames:
        raise InvalidStudy(
            f"the multi-frame image has {len(per_frame)} per-frame functional groups for its {frames} frames"
        )
    shared_item = shared[0] if shared else None
    return [(per_frame[i] if per_frame else None, shared_item) for i in range(frames)]


def _sequence(dataset, keyword: str) -> Sequence | None:
    """The sequence ``keyword`` of ``dataset``, None when absent or empty; 422 naming it when it cannot be decoded."""
    try:
        value = dataset.get(keyword)
    except Exception:  # a deferred sequence is parsed here, and pydicom raises many types for a corrupt one
        raise InvalidStudy(f"a DICOM file's {keyword} cannot be decoded") from None
    if value is not None and not isinstance(value, Sequence):
        raise InvalidStudy(f"a DICOM file's {keyword} is not a sequence")
    return value or None


def _macro(groups, keyword: str, header) -> pydicom.Dataset:
    """The functional group macro ``keyword`` of one frame: its per-frame item, else the shared one, else the
    top-level dataset (where a legacy multi-frame image keeps its one position, orientation or rescale)."""
    for item in groups:
        if item is not None and (sequence := _sequence(item, keyword)):
            return sequence[0]
    return header


def _check_one_stack(groups) -> None:
    """A volume is one stack at one time: several stacks (StackID) or temporal positions are refused."""
    for keyword, what in (("StackID", "stacks"), ("TemporalPositionIndex", "temporal positions")):
        values = set()
        for group in groups:
            content = _macro(group, "FrameContentSequence", pydicom.Dataset())
            value = content.get(keyword)
            if value is not None:
                values.add(str(value))
        if len(values) > 1:
            raise InvalidStudy(
                f"the multi-frame image holds {len(values)} {what} ({keyword}); a volume is one stack at one time"
            )


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


def _rescale_of(item) -> _Rescale:
    """The Modality LUT, or RescaleSlope and RescaleIntercept, of ``item`` (a header or a functional group)."""
    _decode(item, _RESCALE_ELEMENTS)
    if "ModalityLUTSequence" in item:
        return _Rescale(1.0, 0.0, lut=item)
    # Parsed here, not by pydicom: a header may hold text that is no number (and pydicom would multiply by it).
    slope = _numbers(item, "RescaleSlope", 1, default=1)[0]
    intercept = _numbers(item, "RescaleIntercept", 1, default=0)[0]
    if slope == 0:
        raise InvalidStudy("RescaleSlope is 0: every voxel would have one value")
    return _Rescale(slope, intercept)


def _decode_slices(slices: list[_Slice], shape: tuple[int, int]) -> np.ndarray:
    """The slices' (columns, rows, len(slices)) float32 voxels in modality units, decoded one thread a core.

    The array is in Fortran order, as nibabel gives a NIfTI image: each slice is one contiguous block, so every
    thread writes its own part of memory.
    """
    rows, cols = shape
    array = np.empty((cols, rows, len(slices)), dtype=np.float32, order="F")

    def decode(k: int) -> None:
        _to_modality_units(_stored_values(slices[k], shape), slices[k].rescale, array[:, :, k].T)

    _run_in_threads(decode, len(slices))
    return array


def _run_in_threads(work: Callable[[int], None], count: int) -> None:
    """``work(k)`` for k in range(count), one thread a core; the first error is raised and the rest cancelled."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1)))
    try:
        for _ in pool.map(work, range(count)):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _stored_values(piece: _Slice, shape: tuple[int, int]) -> np.ndarray:
    """One slice's (rows, columns) stored values, as pydicom's decoders give them."""
    pixels = _native_values(piece.header, piece.frame, shape)
    if pixels is None:
        source = piece.pydicom_source
        deflated = piece.header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if isinstance(source, str) and deflated:
            source = _read_file(source)  # inflated as a whole: pydicom cannot read its pixels from an offset
        try:
            pixels = pixel_array(source, index=piece.frame)
        except Exception as e:  # pydicom raises many types for pixel data it cannot decode
            syntax = piece.header.file_meta.get("TransferSyntaxUID")
            raise InvalidStudy(
                f"the pixel data cannot be decoded (transfer syntax {getattr(syntax, 'name', 'unknown')})"
            ) from e
    if pixels.shape != shape:
        raise InvalidStudy(f"a slice's pixel data decodes to shape {pixels.shape}, not its Rows x Columns {shape}")
    return pixels


def _native_values(header, frame: int | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Frame ``frame``'s (rows, columns) stored values read straight from the file, when they are uncompressed
    little-endian integers of 8, 16 or 32 bits filling exactly the pixel data; None for anything else, which
    pydicom's own decoder reads (and whose failures it words). What pydicom would do to them is done too."""
    if header.file_meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        allocated, stored = int(header.BitsAllocated), int(header.BitsStored)
        signed, frames = int(header.PixelRepresentation), int(header.get("NumberOfFrames") or 1)
    except Exception:  # absent, empty or undecodable: pydicom's path says what is wrong
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or signed not in (0, 1):
        return None
    rows, cols = shape
    frame_bytes = rows * cols * allocated // 8
    offset = frame_bytes * (frame or 0)
    element = header.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    deferred = isinstance(element, RawDataElement) and element.value is None
    length = element.length if deferred else len(element.value or b"")
    expected = frame_bytes * (frames if frame is not None else 1)
    if length not in (expected, expected + expected % 2):  # an odd length is padded to even
        return None
    if deferred:
        with open(header.filename, "rb") as file:
            file.seek(element.value_tell + offset)
            data = file.read(frame_bytes)
    else:
        data = bytes(element.value[offset : offset + frame_bytes])
    if len(data) != frame_bytes:
        return None
    pixels = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{allocated // 8}").reshape(rows, cols)
    if stored < allocated:
        # The unused high bits may hold anything (PS3.5 8.1.1): shifted out, and the sign extended, as pydicom does.
        unused = allocated - stored
        pixels = np.right_shift(np.left_shift(pixels, unused), unused)
    return pixels


def _to_modality_units(pixels: np.ndarray, rescale: _Rescale, out: np.ndarray) -> None:
    """``pixels`` (rows, columns) rescaled into ``out``, a (rows, columns) float32 view of the volume."""
    if rescale.lut is not None:
        try:
            out[...] = apply_rescale(pixels, rescale.lut)
        except Exception:  # a table that does not fit the pixels, or lies about its own length
            raise InvalidStudy("the slice's Modality LUT cannot be applied to its pixels") from None
    elif (rescale.slope, rescale.intercept) == (1, 0):
        out[...] = pixels
    else:
        out[...] = pixels * rescale.slope + rescale.intercept
