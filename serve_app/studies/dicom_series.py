"""Read one DICOM image series into a ``Volume`` with pydicom: a series of single-frame images, or one enhanced
(multi-frame) CT or MR image whose functional groups place each frame.

Each file (a file of its own, or an entry stored in the upload's zip archive: ``upload.DicomFile``) is parsed once,
its pixel data left on disk; the slices are ordered by their position along the slice
normal (not by file name, InstanceNumber or frame number) and the grid's spacing, origin and direction come from the
headers. Only then are the pixels decoded and rescaled to modality units (HU for CT). Uncompressed little-endian
integers are read straight from the file offset the header pass found, into the volume itself, in one thread;
compressed frames of one syntax and layout are decoded as one batch (``frame_decoders``: the GPU, the header
processes or threads); anything else goes through pydicom's pixel-data plugins (``transfer_syntaxes``), one thread a
core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.studies.checks import (
    check_affine,
    check_direction_cosines,
    check_finite_voxels,
    check_pixel_spacing,
    finite_numbers,
)
from serve_app.studies.dicom_source import DicomSource, SourceFrame, header_bytes
from serve_app.studies.frame_decoders import GPU_SYNTAXES, FramePixels, decode_frames
from serve_app.studies.header_processes import HeaderProcesses
from serve_app.studies.transfer_syntaxes import require_decoder
from serve_app.studies.upload import DicomFile
from serve_app.studies.volume import LPS_TO_RAS, Volume

__all__ = ["read_dicom_series"]

_DICOMDIR = "1.2.840.10008.1.3.10"
_IMAGE_SIZE = ("Rows", "Columns")
_REQUIRED = (*_IMAGE_SIZE, "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
# What is read of each slice's header, and of its pixel module besides what pydicom's decoder reads itself.
_HEADER_TAGS = {
    keyword: tag_for_keyword(keyword)
    for keyword in (
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
}
_RESCALE_TAGS = {
    keyword: tag_for_keyword(keyword) for keyword in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept")
}
_PIXEL_DATA_TAG = 0x7FE00010
# Syntaxes whose pixel data is the stored values as they lie in memory on a little-endian host. Deflated data is
# little-endian too, but compressed as a whole: pydicom inflates it.
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Compressed syntaxes whose frames are decoded in one batch (``frame_decoders``); others one slice at a time.
_BATCHED_SYNTAXES = (*GPU_SYNTAXES, RLELossless)
# Relative spread of slice steps tolerated before the series is called uneven (rounding in headers).
_STEP_TOLERANCE = 0.05
# Grey-scale: one sample a pixel. MONOCHROME1 displays inverted, but its rescaled values are the same units.
_GREY_SCALE = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class _Rescale:
    """How one slice's stored values become modality units: a Modality LUT, or a slope and an intercept."""

    slope: float
    intercept: float
    lut: pydicom.Dataset | None = None  # the dataset holding ModalityLUTSequence, applied by pydicom


@dataclass(frozen=True)
class _NativeLayout:
    """Where uncompressed little-endian integer pixel data lies in a file, and how its values are stored."""

    path: str
    offset: int  # of the pixel data's value in the file
    frame_bytes: int
    dtype: str  # numpy's, e.g. "<i2"
    unused_bits: int  # high bits of each value that are not stored bits (PS3.5 8.1.1)


@dataclass(frozen=True)
class _Encapsulated:
    """Compressed pixel data: its transfer syntax, its frames' layout, and where its value starts in a single-frame
    file (None in a multi-frame image, whose dataset is read whole)."""

    syntax: str  # the UID
    pixels: FramePixels
    offset: int | None


@dataclass(frozen=True)
class _Slice:
    """One slice of the volume to decode: where its values lie, and how they rescale."""

    rescale: _Rescale
    native: _NativeLayout | None  # None: pydicom decodes the pixel data
    # What pydicom decodes when the values cannot be read straight from the file: a single-frame file, or the
    # whole multi-frame dataset (read once, its frames then decoded in parallel).
    pydicom_source: pydicom.Dataset | DicomFile
    syntax: str  # the transfer syntax's name, for errors
    frame: int | None = None  # 0-based frame of a multi-frame image; None for a single-frame one
    encapsulated: _Encapsulated | None = None  # compressed frames that ``frame_decoders`` can decode in a batch


@dataclass(frozen=True)
class _ImageFile:
    """What the header pass keeps of one DICOM image: plain values, cheap to send back from a parsing process.

    A single-frame image's geometry is read and checked in the pass; a multi-frame one keeps its whole header, as
    its frames' geometry lies in functional groups (such an image is read alone, never in a parsing process).
    """

    file: DicomFile
    series_instance_uid: str
    size: tuple[int, int]  # (rows, columns)
    multi_frame: pydicom.Dataset | None
    slice: _Slice | None  # single-frame images only, as are the geometry fields that follow
    orientation: np.ndarray | None  # (6,) ImageOrientationPatient
    position: np.ndarray | None  # (3,) ImagePositionPatient, LPS mm
    pixel_spacing: np.ndarray | None  # (2,) row spacing, column spacing
    thickness: float | None  # SpacingBetweenSlices, else SliceThickness
    modality: str | None
    study_instance_uid: str | None
    source: bytes  # the header as a DICOM file without pixel data (``header_bytes``)


def read_dicom_series(
    files: list[DicomFile | Path], limits: LimitsConfig, parsers: HeaderProcesses | None = None
) -> Volume:
    """One DICOM image series as a ``Volume``: (columns, rows, slices) in modality units, RAS affine.

    ``files`` (``sort_upload``'s, or paths) hold either single-frame images of one series, or one multi-frame image
    whose frames are the slices.
    ``parsers``, when given, parse a long series' headers in their processes (pydicom's parser holds the GIL).
    Raises ``UnsupportedMediaType`` (415) for pixel data in a transfer syntax no installed decoder reads (judged
    from the headers), ``InvalidStudy`` (422) for anything that is not one grey-scale series on a real grid, and
    ``PayloadTooLarge`` (413) for one over ``limits.max_volume_voxels``, judged from headers alone.
    """
    dicom_files = [f if isinstance(f, DicomFile) else DicomFile(Path(f)) for f in files]
    images = [image for image in _parse_headers(dicom_files, parsers) if image is not None]
    if not images:
        raise InvalidStudy("the upload holds no DICOM images")
    _check_one_series(images)
    if images[0].multi_frame is not None:
        return _read_multi_frame(images[0], limits, parsers)
    return _read_single_frames(images, limits, parsers)


def _read_single_frames(files: list[_ImageFile], limits: LimitsConfig, processes: HeaderProcesses | None) -> Volume:
    """Single-frame images, one a slice; ``Volume.source`` lists them in slice order."""
    (rows, cols), n = files[0].size, len(files)
    _check_voxel_limit(rows, cols, n, limits)
    orientations = np.array([f.orientation for f in files])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise InvalidStudy("the slices have different orientations (ImageOrientationPatient)")
    row_dir, col_dir = check_direction_cosines(orientations[0][:3], orientations[0][3:])
    normal = np.cross(row_dir, col_dir)
    files.sort(key=lambda f: float(np.dot(f.position, normal)))
    step = _slice_step([f.position for f in files], normal, files[0].thickness)
    row_spacing, col_spacing = files[0].pixel_spacing
    check_pixel_spacing((row_spacing, col_spacing))

    array = _decode_slices([f.slice for f in files], (rows, cols), processes)
    affine = _affine(row_dir * col_spacing, col_dir * row_spacing, step, files[0].position)
    source = DicomSource(headers=[f.source for f in files], slices=[SourceFrame(k) for k in range(n)])
    return _volume(array, affine, files[0].modality, files[0].study_instance_uid, source)


def _read_multi_frame(image: _ImageFile, limits: LimitsConfig, processes: HeaderProcesses | None) -> Volume:
    """An enhanced (or legacy-converted enhanced) multi-frame image whose frames are one stack of slices, placed
    by its Shared / Per-frame Functional Groups; ``Volume.source`` names each slice's frame."""
    header, file = image.multi_frame, image.file
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
    step = _slice_step([positions[i] for i in order], normal, _thickness(measures[0]))
    row_spacing, col_spacing = spacings[0]
    check_pixel_spacing((row_spacing, col_spacing))

    # Uncompressed frames are read from the file where they lie; others decoded by pydicom from one full read of it.
    native = _native_layout(header, (rows, cols), file)
    pydicom_source = header if native else _read_dataset(file)
    syntax = _syntax_name(header)
    encapsulated = _encapsulated(header, (rows, cols))
    slices = [
        _Slice(
            _rescale_of(_macro(groups[i], "PixelValueTransformationSequence", header)),
            native,
            pydicom_source,
            syntax,
            i,
            encapsulated,
        )
        for i in order
    ]
    array = _decode_slices(slices, (rows, cols), processes)
    affine = _affine(row_dir * col_spacing, col_dir * row_spacing, step, positions[order[0]])
    source = DicomSource(headers=[image.source], slices=[SourceFrame(0, i + 1) for i in order])
    return _volume(array, affine, _text(header, "Modality"), _text(header, "StudyInstanceUID"), source)


def _volume(
    array: np.ndarray, affine: np.ndarray, modality: str | None, study_instance_uid: str | None, source: DicomSource
) -> Volume:
    check_finite_voxels(array, "the series")  # a huge RescaleSlope overflows float32
    check_affine(affine, "the series' geometry")
    return Volume(array=array, affine=affine, modality=modality, study_instance_uid=study_instance_uid, source=source)


def _affine(column_step: np.ndarray, row_step: np.ndarray, slice_step: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The (4, 4) voxel -> RAS mm affine of a grid given in LPS: the steps along i (a row), j (a column), k."""
    affine_lps = np.eye(4)
    affine_lps[:3, :] = np.column_stack([column_step, row_step, slice_step, origin])
    return LPS_TO_RAS @ affine_lps


def _check_voxel_limit(rows: int, cols: int, slices: int, limits: LimitsConfig) -> None:
    if rows * cols * slices > limits.max_volume_voxels:
        raise PayloadTooLarge(
            f"the series has {rows}x{cols}x{slices} voxels, over this server's limit of {limits.max_volume_voxels}"
        )


def _parse_headers(files: list[DicomFile], parsers: HeaderProcesses | None) -> list[_ImageFile | None]:
    """Each file's ``_ImageFile`` (None for a DICOMDIR), in ``files``' order; in ``parsers``' processes when given."""
    if parsers is None or len(files) < 2:
        return _parse_files(files)
    return parsers.map(_parse_files, files)


def _parse_files(files: list[DicomFile]) -> list[_ImageFile | None]:
    return [_parse_file(file) for file in files]


def _parse_file(file: DicomFile) -> _ImageFile | None:
    """One file's header, checked on its own; None for a DICOMDIR. Runs in a parsing process too."""
    with file.open() as stream:
        ds = _read_file(stream, defer_size=1024)  # pixel data left on disk, but whether it is there is known
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
            return None
        values = _decoded(ds, _HEADER_TAGS)
        multi_frame = _integer(values, "NumberOfFrames", 1) > 1
        _check_image(ds, values, multi_frame)
        size = (_integer(values, "Rows"), _integer(values, "Columns"))
        common = {
            "file": file,
            "series_instance_uid": _text(values, "SeriesInstanceUID") or "",
            "size": size,
            "modality": _text(values, "Modality"),
            "study_instance_uid": _text(values, "StudyInstanceUID"),
        }
        if multi_frame:
            if file.size is not None:
                # Its header is read on after this file closes, deferred elements and all, by name: an archive
                # entry has none, so the image is unpacked first.
                return _parse_file(file.unpacked())
            return _ImageFile(
                **common,
                multi_frame=ds,
                slice=None,
                orientation=None,
                position=None,
                pixel_spacing=None,
                thickness=None,
                source=header_bytes(ds, stream),
            )
        return _ImageFile(
            **common,
            multi_frame=None,
            slice=_Slice(
                _rescale_of(ds),
                _native_layout(ds, size, file),
                file,
                _syntax_name(ds),
                encapsulated=_encapsulated(ds, size),
            ),
            orientation=_numbers(values, "ImageOrientationPatient", 6),
            position=_numbers(values, "ImagePositionPatient", 3),
            pixel_spacing=_numbers(values, "PixelSpacing", 2),
            thickness=_thickness(values),
            source=header_bytes(ds, stream),
        )


def _read_dataset(file: DicomFile) -> pydicom.FileDataset:
    """``file`` read whole by pydicom; 422 for a file it cannot parse."""
    with file.open() as stream:
        return _read_file(stream)


def _read_file(stream: BinaryIO, defer_size: int | None = None) -> pydicom.FileDataset:
    """The DICOM file ``stream`` holds (from its start) as pydicom parses it; 422 for a file it cannot parse."""
    try:
        return pydicom.dcmread(stream, defer_size=defer_size)
    except Exception:  # pydicom raises many types for a cut or corrupt file (struct.error, EOFError, ValueError, ...)
        raise InvalidStudy("a DICOM file is truncated or unreadable") from None


def _decoded(ds, tags: dict[str, int]) -> dict[str, Any]:
    """The values of the elements ``tags`` names that ``ds`` holds, by keyword, decoded now so that bytes pydicom
    cannot decode are a 422 naming the element: pydicom decodes a value when it is first read, and raises one of
    several types (for a US of 3 bytes, say). Read once into a dict: each read through the dataset looks the
    keyword up again, and the header pass read its dozen elements 44 times a file."""
    values = {}
    for keyword, tag in tags.items():
        if tag in ds:
            try:
                values[keyword] = ds[tag].value
            except Exception:
                raise InvalidStudy(f"a DICOM file's {keyword} cannot be decoded") from None
    return values


def _check_image(ds: pydicom.Dataset, values: dict[str, Any], multi_frame: bool) -> None:
    """One grey-scale image with pixel data in a transfer syntax this server decodes (else a 415); ``values``: its
    header elements (``_decoded``)."""
    if _PIXEL_DATA_TAG not in ds:
        raise InvalidStudy("a DICOM file of the series has no pixel data")
    _check_grey_scale(values)  # first: a colour image (a photo, a screenshot) often lacks the geometry too
    # A multi-frame image places its frames in functional groups, not in these top-level elements.
    missing = [keyword for keyword in (_IMAGE_SIZE if multi_frame else _REQUIRED) if keyword not in values]
    if missing:
        raise InvalidStudy(f"a DICOM image lacks {', '.join(missing)}")
    if syntax := str(ds.file_meta.get("TransferSyntaxUID", "")):
        require_decoder(syntax)  # a missing syntax is left to pydicom, whose failure to decode is a 422
    rows, cols = _integer(values, "Rows"), _integer(values, "Columns")
    if min(rows, cols) < 1:
        raise InvalidStudy(f"a slice has {rows} rows and {cols} columns; an image needs at least one of each")


def _check_one_series(files: list[_ImageFile]) -> None:
    """The images are one series of one size: several single-frame images, or one multi-frame image."""
    series = {f.series_instance_uid for f in files}
    if len(series) > 1:
        raise InvalidStudy(f"the upload holds slices of {len(series)} different series; send one series per request")
    if len(files) > 1 and any(f.multi_frame is not None for f in files):
        raise InvalidStudy(
            "multi-frame DICOM images are not supported in an upload of several files; "
            "send one multi-frame image alone, or one file per slice"
        )
    sizes = sorted({f.size for f in files})
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


def _slice_step(positions: list[np.ndarray], normal: np.ndarray, thickness: float | None) -> np.ndarray:
    """The vector from one slice's origin to the next's, given their positions in slice order."""
    if len(positions) == 1:
        # One slice: its thickness only scales volumes in mL, and headers omit it or get it wrong; 1 mm then.
        return normal * (thickness if thickness is not None and np.isfinite(thickness) and thickness > 0 else 1.0)
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


def _thickness(item) -> float | None:
    """SpacingBetweenSlices, else SliceThickness, of a header or a functional group; None when neither is a number."""
    try:
        return float(item.get("SpacingBetweenSlices") or item.get("SliceThickness"))
    except (TypeError, ValueError):
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    return str(ds.get(keyword, "")) or None


def _syntax_name(ds: pydicom.Dataset) -> str:
    return getattr(ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None, "name", "unknown")


def _rescale_of(item) -> _Rescale:
    """The Modality LUT, or RescaleSlope and RescaleIntercept, of ``item`` (a header or a functional group)."""
    values = _decoded(item, _RESCALE_TAGS)
    if "ModalityLUTSequence" in values:
        return _Rescale(1.0, 0.0, lut=item)
    # Parsed here, not by pydicom: a header may hold text that is no number (and pydicom would multiply by it).
    slope = _numbers(values, "RescaleSlope", 1, default=1)[0]
    intercept = _numbers(values, "RescaleIntercept", 1, default=0)[0]
    if slope == 0:
        raise InvalidStudy("RescaleSlope is 0: every voxel would have one value")
    return _Rescale(slope, intercept)


def _decode_slices(slices: list[_Slice], shape: tuple[int, int], processes: HeaderProcesses | None) -> np.ndarray:
    """The slices' (columns, rows, len(slices)) voxels in modality units; compressed frames decoded in one batch
    where they can be (``_batch_decoded``), with ``processes`` for decoders that hold the GIL.

    int16 where every slice's rescale only shifts its integers (slope 1, an integer intercept: CT's usual
    -1024) and the values fit, as NIfTI's CT arrives: half the bytes of float32 to hold, check and copy to the
    device, where they are widened. float32 otherwise.

    The array is in Fortran order, as nibabel gives a NIfTI image: each slice is one contiguous block, which its
    stored values are read into and rescaled in place, and every thread writes its own part of memory.
    """
    stored = _batch_decoded(slices, processes)
    if all(_shifts_integers(s.rescale) for s in slices):
        try:
            return _decode_slices_as(np.int16, slices, shape, stored)
        except _OutsideInt16:
            pass  # rare (16-bit values near the type's ends, shifted): the whole series as float32
    return _decode_slices_as(np.float32, slices, shape, stored)


class _OutsideInt16(Exception):
    """A slice's values in modality units do not fit int16 (or are not integers)."""


def _shifts_integers(rescale: _Rescale) -> bool:
    return rescale.lut is None and rescale.slope == 1 and float(rescale.intercept).is_integer()


def _decode_slices_as(
    dtype: type, slices: list[_Slice], shape: tuple[int, int], stored: np.ndarray | None
) -> np.ndarray:
    """``stored``: the slices' (len(slices), rows, columns) stored values decoded already; None: decoded here."""
    rows, cols = shape
    array = np.empty((cols, rows, len(slices)), dtype=dtype, order="F")

    def decode(k: int) -> None:
        out = array[:, :, k].T
        values = stored[k] if stored is not None else _stored_values(slices[k], out)
        _to_modality_units(values, slices[k].rescale, out)

    if stored is not None or all(piece.native is not None for piece in slices):
        # Uncompressed values are copied, not decoded: one thread copies them as fast as two, for 64 against 114
        # CPU-ms a 300-slice series (2 cores), and a busy node has better work for its other cores.
        for k in range(len(slices)):
            decode(k)
    else:
        _run_in_threads(decode, len(slices))
    return array


def _batch_decoded(slices: list[_Slice], processes: HeaderProcesses | None) -> np.ndarray | None:
    """The slices' stored values, (len(slices), rows, columns), decoded in one batch by ``frame_decoders`` when all
    are compressed frames of one syntax and layout; None otherwise (each slice is then decoded on its own)."""
    formats = {(s.encapsulated.syntax, s.encapsulated.pixels) if s.encapsulated else None for s in slices}
    if len(formats) != 1 or None in formats:
        return None
    (syntax, pixels), frames = formats.pop(), []
    try:
        in_dataset = None  # a multi-frame image's frames, split once
        for piece in slices:
            source = piece.pydicom_source
            if isinstance(source, DicomFile):
                with source.open() as stream:
                    stream.seek(piece.encapsulated.offset)
                    frames.append(get_frame(stream, 0, number_of_frames=1))
            else:
                in_dataset = in_dataset or list(generate_frames(source.PixelData, number_of_frames=len(slices)))
                frames.append(in_dataset[piece.frame])
    except Exception as e:  # pydicom raises several types for encapsulation that is cut short or malformed
        raise InvalidStudy(f"the pixel data's frames cannot be read (transfer syntax {slices[0].syntax})") from e
    return decode_frames(frames, syntax, pixels, processes)


def _encapsulated(header: pydicom.Dataset, shape: tuple[int, int]) -> _Encapsulated | None:
    """``header``'s compressed pixel data, when its frames are grey-scale integers of 8 or 16 bits in a syntax
    ``frame_decoders`` takes, and (in a single-frame file) left on disk by the header pass; None otherwise."""
    syntax = header.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated or syntax not in _BATCHED_SYNTAXES:
        return None
    try:
        allocated, stored = int(header.BitsAllocated), int(header.BitsStored)
        signed, samples = int(header.PixelRepresentation), int(header.get("SamplesPerPixel") or 1)
    except Exception:  # absent, empty or undecodable: pydicom's path says what is wrong
        return None
    if allocated not in (8, 16) or not 0 < stored <= allocated or signed not in (0, 1) or samples != 1:
        return None
    element = header.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    offset = element.value_tell if isinstance(element, RawDataElement) and element.value is None else None
    if offset is None and int(header.get("NumberOfFrames") or 1) == 1:
        return None
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    return _Encapsulated(str(syntax), FramePixels(*shape, allocated, stored, signed, photometric), offset)


def _run_in_threads(work: Callable[[int], None], count: int) -> None:
    """``work(k)`` for k in range(count), one thread a core; the first error is raised and the rest cancelled."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1)))
    try:
        for _ in pool.map(work, range(count)):
            pass
    finally:
        pool.shutdown(cancel_futures=True)


def _stored_values(piece: _Slice, out: np.ndarray) -> np.ndarray:
    """One slice's (rows, columns) stored values, as pydicom's decoders give them; read into ``out``'s memory (the
    slice's place in the volume) where they are uncompressed and of its item size (``_read_native``)."""
    shape = out.shape
    pixels = _read_native(piece.native, piece.frame or 0, out) if piece.native is not None else None
    if pixels is None:
        with _pydicom_source(piece) as source:
            try:
                pixels = pixel_array(source, index=piece.frame)
            except Exception as e:  # pydicom raises many types for pixel data it cannot decode
                raise InvalidStudy(f"the pixel data cannot be decoded (transfer syntax {piece.syntax})") from e
    if pixels.shape != shape:
        raise InvalidStudy(f"a slice's pixel data decodes to shape {pixels.shape}, not its Rows x Columns {shape}")
    return pixels


@contextmanager
def _pydicom_source(piece: _Slice) -> Iterator[pydicom.Dataset | BinaryIO]:
    """What pydicom decodes ``piece``'s pixels from: the dataset read already, or the file, open; a deflated file is
    read whole first (inflated as a whole, its pixels cannot be read from an offset)."""
    source = piece.pydicom_source
    if not isinstance(source, DicomFile):
        yield source
    elif piece.syntax == DeflatedExplicitVRLittleEndian.name:
        yield _read_dataset(source)
    else:
        with source.open() as stream:
            yield stream


def _native_layout(header: pydicom.Dataset, shape: tuple[int, int], file: DicomFile) -> _NativeLayout | None:
    """Where ``header``'s pixel data, read from ``file``, lies on disk, when its values are uncompressed
    little-endian integers of 8, 16 or 32 bits, left on disk by the header pass and filling exactly the pixel data;
    None for anything else, which pydicom's own decoder reads (and whose failures it words)."""
    if header.file_meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    try:
        allocated, stored = int(header.BitsAllocated), int(header.BitsStored)
        signed, frames = int(header.PixelRepresentation), int(header.get("NumberOfFrames") or 1)
    except Exception:  # absent, empty or undecodable: pydicom's path says what is wrong
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or signed not in (0, 1):
        return None
    element = header.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if not (isinstance(element, RawDataElement) and element.value is None):
        return None
    rows, cols = shape
    frame_bytes = rows * cols * allocated // 8
    expected = frame_bytes * frames
    if element.length not in (expected, expected + expected % 2):  # an odd length is padded to even
        return None
    dtype = f"<{'i' if signed else 'u'}{allocated // 8}"
    return _NativeLayout(str(file.path), file.offset + element.value_tell, frame_bytes, dtype, allocated - stored)


def _read_native(layout: _NativeLayout, frame: int, out: np.ndarray) -> np.ndarray | None:
    """Frame ``frame``'s (rows, columns) stored values, read from where ``layout`` says they lie: into the memory of
    ``out`` (C-contiguous, (rows, columns)) when they have its item size, returned as a view of it in their stored
    type (CT's int16 into an int16 volume: no copy of them in between), else into an array of their own. None when
    the file is cut short of them (pydicom's decoder then says what is wrong)."""
    stored = np.dtype(layout.dtype)
    pixels = out.view(stored) if stored.itemsize == out.itemsize else np.empty(out.shape, stored)
    with open(layout.path, "rb") as file:
        file.seek(layout.offset + layout.frame_bytes * frame)
        if file.readinto(memoryview(pixels).cast("B")) != layout.frame_bytes:
            return None
    if layout.unused_bits:
        # The unused high bits may hold anything (PS3.5 8.1.1): shifted out, and the sign extended, as pydicom does.
        np.left_shift(pixels, layout.unused_bits, out=pixels)
        np.right_shift(pixels, layout.unused_bits, out=pixels)
    return pixels


def _to_modality_units(pixels: np.ndarray, rescale: _Rescale, out: np.ndarray) -> None:
    """``pixels`` (rows, columns) rescaled into ``out``, a (rows, columns) view of the volume: float32, or int16
    for a rescale that only shifts integers (``_OutsideInt16`` where the shifted values do not fit). ``pixels`` may
    be ``out``'s own memory seen in another type: numpy computes as if they did not overlap."""
    if rescale.lut is not None:
        try:
            out[...] = apply_rescale(pixels, rescale.lut)
        except Exception:  # a table that does not fit the pixels, or lies about its own length
            raise InvalidStudy("the slice's Modality LUT cannot be applied to its pixels") from None
    elif out.dtype == np.int16:
        shift = int(rescale.intercept)
        if pixels.dtype.kind not in "iu":
            raise _OutsideInt16
        low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if low + shift < -32768 or high + shift > 32767:
            raise _OutsideInt16
        if pixels.dtype.itemsize <= 2 and high <= 32767 and -32768 <= shift <= 32767:
            # Added in int16 (the sums fit, as checked): a third of the time of widening each value to int32.
            stored = pixels.view(np.int16) if pixels.dtype == np.uint16 else pixels
            np.add(stored, np.int16(shift), out=out)
        else:
            np.add(pixels, np.int32(shift), out=out, casting="unsafe")  # int32: a uint32, or a uint16 over 32767
    elif (rescale.slope, rescale.intercept) == (1, 0):
        out[...] = pixels
    else:
        out[...] = pixels * rescale.slope + rescale.intercept
