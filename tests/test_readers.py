"""Reading studies: real DICOM files (pydicom's own samples and generated series) and NIfTI."""

import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.reader import read_study
from serve_app.studies.volume import Volume


def test_series_is_ordered_by_position_not_by_file_order(phantom, phantom_series):
    shuffled = list(phantom_series)
    random.Random(0).shuffle(shuffled)
    volume = read_dicom_series(shuffled, LimitsConfig())
    assert volume.shape == phantom.volume.shape
    np.testing.assert_allclose(volume.affine, phantom.volume.affine, atol=1e-6)
    # int16 storage rounds to whole HU
    np.testing.assert_allclose(volume.array, np.rint(phantom.volume.array), atol=1.0)
    assert volume.modality == "CT"


def test_oblique_series_keeps_its_direction_and_spacing(tmp_path):
    phantom = ct_phantom(np.random.default_rng(5), shape=(32, 40, 12), spacing=(1.5, 1.25, 3.0))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = phantom.volume.affine.copy()
    affine[:3, :3] = rotation @ affine[:3, :3]
    paths = write_ct_series(Volume(phantom.volume.array, affine, "CT"), tmp_path)
    volume = read_dicom_series(paths[::-1], LimitsConfig())
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.spacing == pytest.approx((1.5, 1.25, 3.0))


def test_pydicom_ct_sample_reads_as_one_slice_in_hu():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_dicom_series([path], LimitsConfig())
    assert volume.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(volume.array[:, :, 0], apply_rescale(ds.pixel_array, ds).T)
    row_spacing, col_spacing = map(float, ds.PixelSpacing)
    assert volume.spacing[:2] == pytest.approx((col_spacing, row_spacing))
    assert volume.spacing[2] == pytest.approx(float(ds.SliceThickness))


def test_pydicom_mr_sample_keeps_its_modality():
    assert read_dicom_series([get_testdata_file("MR_small.dcm")], LimitsConfig()).modality == "MR"


def test_nifti_upload_reads_with_its_affine(tmp_path, phantom):
    folder = tmp_path / "upload"
    folder.mkdir()
    nib.save(nib.Nifti1Image(phantom.volume.array, phantom.volume.affine), str(folder / "000000"))
    volume = read_study(folder, LimitsConfig())
    np.testing.assert_allclose(volume.affine, phantom.volume.affine)
    np.testing.assert_allclose(volume.array, phantom.volume.array)


def test_four_d_nifti_is_refused(tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(folder / "000000"))
    with pytest.raises(InvalidStudy, match="3D volume"):
        read_study(folder, LimitsConfig())


def test_uneven_slice_spacing_means_a_missing_slice(phantom_series):
    with pytest.raises(InvalidStudy, match="uneven"):
        read_dicom_series(phantom_series[:10] + phantom_series[11:], LimitsConfig())


@pytest.mark.parametrize(
    "stored, slope, read_as",
    [("int16", None, "int16"), ("uint16", None, "float32"), ("int16", 0.5, "float32")],
    ids=["CT int16 kept for the device", "uint16 widened on the host", "scaled by the header"],
)
def test_nifti_voxels_keep_their_values(tmp_path, stored, slope, read_as):
    values = np.arange(4 * 5 * 6).reshape(4, 5, 6).astype(stored)
    image = nib.Nifti1Image(values, np.eye(4))
    if slope is not None:
        image.header.set_slope_inter(slope, -10)
    nib.save(image, str(tmp_path / "000000"))
    volume = read_study(tmp_path, LimitsConfig())
    assert volume.array.dtype == np.dtype(read_as)
    expected = values * slope - 10 if slope is not None else values
    np.testing.assert_allclose(volume.array, expected)


def test_nifti_of_colours_is_refused(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "000000"))
    with pytest.raises(InvalidStudy, match="numbers are needed"):
        read_study(tmp_path, LimitsConfig())
