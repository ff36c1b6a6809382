"""Hypothesis strategies for hostile studies, and writers that put a drawn study on disk, shared by the readers'
property-based tests and the live server's."""

import contextlib
import copy
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from hypothesis import assume
from hypothesis import strategies as st
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series

odd_floats = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1e-12, -1.0, 1e30, float("nan"), float("inf"), float("-inf")]),
)
spacing_values = st.one_of(st.floats(0.1, 10), odd_floats)
cosines = st.one_of(
    st.sampled_from([[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1], [1, 0, 0, 1, 0, 0], [0] * 6]),
    st.lists(odd_floats, min_size=6, max_size=6),
)
TEXT_VALUED = ("RescaleSlope", "RescaleIntercept")
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(["", "abc", "1\\2"])
)


def template_series(folder: Path) -> list[pydicom.Dataset]:
    """A tiny valid CT series (8 x 8 x 3) to change header by header."""
    phantom = ct_phantom(np.random.default_rng(3), shape=(8, 8, 3), spacing=(2.0, 2.0, 3.0))
    return [pydicom.dcmread(p) for p in write_ct_series(phantom.volume, folder)]


@st.composite
def slice_changes(draw) -> dict:
    """Header values of a generated DICOM series, each drawn or left as the template has it."""
    changes = {}
    maybe = lambda strategy: draw(st.one_of(st.none(), strategy))  # noqa: E731
    for keyword, strategy in {
        "PixelSpacing": st.lists(spacing_values, min_size=0, max_size=3),
        "ImageOrientationPatient": cosines,
        "SliceThickness": spacing_values,
        "Rows": st.integers(0, 9),
        "Columns": st.integers(0, 9),
        "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64]),
        "BitsStored": st.integers(0, 33),
        "PixelRepresentation": st.integers(0, 2),
        "SamplesPerPixel": st.integers(0, 4),
        "PhotometricInterpretation": st.sampled_from(
            ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"]
        ),
        "RescaleSlope": numbers_as_text,
        "RescaleIntercept": numbers_as_text,
        "NumberOfFrames": st.integers(0, 3),
    }.items():
        if (value := maybe(strategy)) is not None:
            changes[keyword] = value
    changes["positions"] = draw(st.sampled_from(["as written", "duplicate", "uneven", "reversed", "nan", "missing"]))
    changes["transfer_syntax"] = draw(
        st.sampled_from(
            [
                ExplicitVRLittleEndian,
                ImplicitVRLittleEndian,
                ExplicitVRBigEndian,
                JPEGBaseline8Bit,
                JPEG2000Lossless,
                RLELossless,
            ]
        )
    )
    changes["pixel_bytes"] = draw(st.sampled_from(["as written", "short", "long", "empty"]))
    return changes


@contextlib.contextmanager
def _writing_any_value():
    """Let pydicom write values that break the standard, as other software does."""
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode = before


def write_series(template, changes: dict, folder) -> None:
    with _writing_any_value():
        for k, original in enumerate(template):
            _write_slice(original, k, changes, folder)


def _write_slice(original, k: int, changes: dict, folder) -> None:
    ds = copy.deepcopy(original)
    for keyword, value in changes.items():
        if keyword in TEXT_VALUED:
            # pydicom will not hold text that is not a number in a DS element: written with another VR, as
            # software that gets the VR wrong writes it; read back under implicit VR, it is a DS again.
            ds.add_new(pydicom.datadict.tag_for_keyword(keyword), "LO", value)
        elif keyword[0].isupper():
            setattr(ds, keyword, value)
    position = [float(v) for v in ds.ImagePositionPatient]
    match changes["positions"]:
        case "duplicate":
            position[2] = 0.0
        case "uneven":
            position[2] *= k + 1
        case "reversed":
            position[2] = -position[2]
        case "nan":
            position[2] = float("nan")
        case "missing":
            del ds.ImagePositionPatient
    if "ImagePositionPatient" in ds:
        ds.ImagePositionPatient = position
    data = bytes(original.PixelData)
    ds.PixelData = {"short": data[: len(data) // 2], "long": data + data, "empty": b""}.get(
        changes["pixel_bytes"], data
    )
    # The file says this syntax; its data stays as written: a mislabelled file is a case worth sending too.
    ds.file_meta.TransferSyntaxUID = changes["transfer_syntax"]
    try:
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    except Exception:
        assume(False)  # pydicom will not write these values at all: no hospital could send them


@st.composite
def nifti_files(draw) -> tuple[nib.Nifti1Image, tuple[float, float] | None]:
    """An image, and the scl_slope and scl_inter to write into its header (None: nibabel's own)."""
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=2, max_size=5)))
    dtype = draw(st.sampled_from([np.int16, np.uint8, np.uint16, np.int32, np.float32, np.float64, np.int64]))
    array = np.zeros(shape, dtype)
    if array.size and np.issubdtype(dtype, np.floating):
        flat = array.reshape(-1)
        for i, value in enumerate(draw(st.lists(odd_floats, max_size=4))):
            flat[i % flat.size] = value
    affine = np.eye(4)
    if draw(st.booleans()):
        affine[:3, :4] = np.asarray(draw(st.lists(odd_floats, min_size=12, max_size=12))).reshape(3, 4)
    image = nib.Nifti1Image(array, None, dtype=dtype)
    image.set_sform(affine, code=draw(st.integers(0, 4)))
    return image, draw(st.one_of(st.none(), st.tuples(odd_floats, odd_floats)))


def write_nifti(image: nib.Nifti1Image, scaling: tuple[float, float] | None, path) -> None:
    """Save, then write the drawn scl_slope and scl_inter into the header as they are: nibabel computes its own
    when it saves (and refuses 0 or infinity), other writers do not."""
    nib.save(image, path)
    if scaling is None:
        return
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    raw = raw[:112] + np.asarray(scaling, "<f4").tobytes() + raw[120:]  # scl_slope, scl_inter: bytes 112-119
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
