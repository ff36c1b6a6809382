"""Property-based tests of the study readers: DICOM series and NIfTI files built from generated header values, or
with the bytes of their values replaced by anything, end, through ``read_study`` and the embedded model's
preprocessing, in a finite model input or a ``RequestError`` (a 4xx) — never in another exception, which the
server would answer with a 500.

Examples per test: ``MEDSERVE_FUZZ_PROFILE=ci`` (the default: bounded and deterministic) or ``fuzz`` (``make fuzz``);
``--hypothesis-show-statistics`` shows how the examples ended (read, or which refusal).
"""

import contextlib
import io
import math
import os
import re
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from serve_app.config import EMBEDDED_MODEL_REPOSITORY, LimitsConfig
from serve_app.errors import RequestError
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.reader import read_study
from study_strategies import nifti_files, odd_floats, slice_changes, template_series, write_nifti, write_series

# Generated headers make nibabel and numpy warn (divisions by zero spacing, and so on): the outcome is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

# Chosen by MEDSERVE_FUZZ_PROFILE and set on each test here, not loaded as Hypothesis' default profile: that one is
# shared by every module of a session, and the last module to load its own would set this one's examples.
EXAMPLES = {
    "ci": settings(max_examples=200, derandomize=True, deadline=None),
    "fuzz": settings(max_examples=3000, deadline=None),
}[os.environ.get("MEDSERVE_FUZZ_PROFILE", "ci")]

LIMITS = LimitsConfig(max_volume_voxels=64**3)
SPEC = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")

# The elements the DICOM reader reads, all of a VR with a 2-byte length in explicit VR little endian.
READ_ELEMENTS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
    "Modality",
    "SeriesInstanceUID",
)
element_bytes = st.one_of(
    st.binary(max_size=16),
    st.text(alphabet="0123456789.-+eE\\ naNif", max_size=24).map(str.encode),
    st.integers(0, 0xFFFF).map(lambda n: struct.pack("<H", n)),
)


def _end(folder) -> None:
    """Read what was written to ``folder`` and preprocess it: a finite model input on a real grid, or a RequestError."""
    try:
        volume = read_study(folder, LIMITS)
        image = to_model_input(volume, SPEC.preprocessing, "cpu")
    except RequestError as e:
        event(f"{e.status_code}: " + re.sub(r"\d[\d.e+-]*", "#", e.reason)[:70])  # one event per kind of refusal
        return
    event("read")
    assert torch.isfinite(image.as_tensor()).all(), "preprocessing made a non-finite model input"
    # Spacing and mL are answered in JSON, which holds no infinity.
    assert all(math.isfinite(s) and s > 0 for s in volume.spacing), volume.spacing
    assert math.isfinite(volume.voxel_volume_ml) and volume.voxel_volume_ml > 0, volume.voxel_volume_ml


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_series(tmp_path_factory.mktemp("template"))


@contextlib.contextmanager
def _upload_folder(tmp_path_factory):
    """A fresh upload folder for one example, removed after it: thousands of examples would fill the disk."""
    folder = tmp_path_factory.mktemp("upload")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@EXAMPLES
@given(changes=slice_changes())
def test_generated_dicom_series_end_in_a_model_input_or_a_4xx(template, tmp_path_factory, changes):
    with _upload_folder(tmp_path_factory) as folder:
        write_series(template, changes, folder)
        _end(folder)


def _with_values(raw: bytes, values: dict[str, bytes]) -> bytes:
    """``raw``, an explicit VR little endian DICOM file, with each element's value replaced by the bytes ``values``
    gives it and its length field rewritten to match: the element is where a reader looks for it, its content anything.
    """
    dataset = pydicom.dcmread(io.BytesIO(raw))
    elements = [(dataset.get_item(pydicom.datadict.tag_for_keyword(k)), value) for k, value in values.items()]
    for element, value in sorted(elements, key=lambda e: -e[0].value_tell):  # from the end: offsets before stay true
        start = element.value_tell
        raw = raw[: start - 2] + struct.pack("<H", len(value)) + value + raw[start + element.length :]
    return raw


@EXAMPLES
@given(
    values=st.dictionaries(st.sampled_from(READ_ELEMENTS), element_bytes, min_size=1, max_size=3),
    in_slice=st.one_of(st.none(), st.integers(0, 2)),
    cut=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(0, 1400))),
    slices=st.integers(1, 3),
)
def test_dicom_values_of_any_bytes_end_in_a_model_input_or_a_4xx(
    template, tmp_path_factory, values, in_slice, cut, slices
):
    """``values``: new value bytes of elements, in slice ``in_slice`` (None: in every slice); ``cut``: a slice and the
    byte it is cut short at; ``slices``: how many of the template's slices are sent (one reads on its own path)."""
    with _upload_folder(tmp_path_factory) as folder:
        for k, original in enumerate(template[:slices]):
            raw = Path(original.filename).read_bytes()
            if in_slice in (None, k):
                raw = _with_values(raw, values)
            if cut is not None and cut[0] == k:
                raw = raw[: cut[1]]
            (folder / f"{k:04d}.dcm").write_bytes(raw)
        _end(folder)


@EXAMPLES
@given(nifti=nifti_files(), gzipped=st.booleans())
def test_generated_nifti_images_end_in_a_model_input_or_a_4xx(tmp_path_factory, nifti, gzipped):
    with _upload_folder(tmp_path_factory) as folder:
        path = folder / ("study.nii.gz" if gzipped else "study.nii")
        try:
            write_nifti(*nifti, path)
        except Exception:
            assume(False)  # nibabel will not write this header at all
        _end(folder)


def _values_of(dtype: np.dtype) -> st.SearchStrategy:
    """Any value of a header field's type, small ones (dimensions, codes) often."""
    if dtype.kind == "f":
        return st.one_of(odd_floats, st.floats(width=dtype.itemsize * 8))
    limits = np.iinfo(dtype)
    return st.one_of(st.integers(max(-2, limits.min), 8), st.integers(limits.min, limits.max))


@st.composite
def nifti_header_edits(draw) -> tuple[type[nib.Nifti1Image], list[tuple[str, int, object]]]:
    """A NIfTI-1 or NIfTI-2 image class, and edits of its header: (a numeric field, an index into it where it is an
    array, a value of its type)."""
    image_class = draw(st.sampled_from([nib.Nifti1Image, nib.Nifti2Image]))
    fields = image_class.header_class.template_dtype
    names = draw(
        st.lists(st.sampled_from([n for n in fields.names if fields[n].base.kind in "iuf"]), min_size=1, max_size=4)
    )
    return image_class, [(name, draw(st.integers(0, 7)), draw(_values_of(fields[name].base))) for name in names]


@EXAMPLES
@given(image_edits=nifti_header_edits(), dtype=st.sampled_from([np.int16, np.float32]))
def test_nifti_header_fields_of_any_value_end_in_a_model_input_or_a_4xx(tmp_path_factory, image_edits, dtype):
    """A valid image with both an sform and a qform, its header then edited as other software might write it:
    nibabel checks nothing of it."""
    image_class, edits = image_edits
    image = image_class(np.arange(6 * 5 * 4, dtype=dtype).reshape(6, 5, 4), np.diag([2.0, -1.5, 3.0, 1.0]))
    image.set_qform(image.affine, code=1)
    raw = image.to_bytes()
    header = image_class.header_class.from_fileobj(io.BytesIO(raw))
    for name, index, value in edits:
        field = header.structarr[name]
        if field.shape:
            field[index % field.shape[0]] = value
        else:
            header.structarr[name] = value
    with _upload_folder(tmp_path_factory) as folder:
        (folder / "study.nii").write_bytes(header.binaryblock + raw[len(header.binaryblock) :])
        _end(folder)
