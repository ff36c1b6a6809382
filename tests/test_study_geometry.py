"""Issue 15, the readers' part: a colour image, degenerate geometry, an empty dimension or non-finite voxels is a 422
naming what is wrong, never a 500 from deep inside MONAI; a real but unusual grid (gantry tilt, flipped axes, one
slice, MONOCHROME1, big endian) still reads and preprocesses."""

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRBigEndian, RLELossless

from serve_app.config import EMBEDDED_MODEL_REPOSITORY, LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.model_repository import ModelRepository
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.reader import read_study
from serve_app.studies.volume import Volume

SPEC = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom(np.random.default_rng(15), shape=(16, 12, 5), spacing=(1.5, 1.25, 3.0)).volume


def _series(folder: Path, volume: Volume, change=None) -> Path:
    """``volume`` written as a CT series into ``folder``, each slice's dataset then changed by ``change``."""
    for path in write_ct_series(volume, folder):
        if change is not None:
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(path, enforce_file_format=True)
    return folder


def _nifti(folder: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, None)
    image.header.set_sform(affine, code=2)  # the header's alone: nibabel would refuse to derive a qform from a bad one
    nib.save(image, folder / "study.nii")
    return folder


def _read(folder: Path) -> torch.Tensor:
    """The study in ``folder`` read and preprocessed for the embedded model, as the server does."""
    image = to_model_input(read_study(folder, LimitsConfig()), SPEC.preprocessing, "cpu").as_tensor()
    assert torch.isfinite(image).all()
    return image


def _refusal(folder: Path) -> InvalidStudy:
    with pytest.raises(InvalidStudy) as refused:
        _read(folder)
    assert refused.value.status_code == 422
    return refused.value


def _set(**values):
    """A change that sets header elements by keyword."""

    def change(ds):
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def _as_colour(photometric: str, samples: int):
    def change(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = samples, photometric, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, samples), np.uint8).tobytes()

    return change


@pytest.mark.parametrize(
    "photometric, samples, reason",
    [
        ("RGB", 3, "not grey-scale (SamplesPerPixel 3, PhotometricInterpretation RGB)"),
        ("YBR_FULL", 3, "not grey-scale (SamplesPerPixel 3, PhotometricInterpretation YBR_FULL)"),
        ("PALETTE COLOR", 1, "not grey-scale (SamplesPerPixel 1, PhotometricInterpretation PALETTE COLOR)"),
    ],
)
def test_colour_series_is_refused_naming_what_it_is(tmp_path, phantom, photometric, samples, reason):
    assert reason in _refusal(_series(tmp_path, phantom, _as_colour(photometric, samples))).reason


def test_monochrome1_reads_as_the_same_values_in_modality_units(tmp_path, phantom):
    # MONOCHROME1 only says how to display (low values white): the rescaled values are HU all the same.
    monochrome1 = _set(PhotometricInterpretation="MONOCHROME1")
    grey = read_study(_series(tmp_path / "2", phantom), LimitsConfig())
    inverted = read_study(_series(tmp_path / "1", phantom, monochrome1), LimitsConfig())
    np.testing.assert_array_equal(inverted.array, grey.array)


def _with_rows_of_three_bytes(path: Path) -> None:
    """Rows (US, 2 bytes) given 3 bytes in the file, as a broken writer might: pydicom raises when it is read."""
    raw = path.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00"
    assert raw.count(rows) == 1
    start = raw.index(rows)
    path.write_bytes(raw[:start] + b"\x28\x00\x10\x00US\x03\x00\x00\x00\x00" + raw[start + len(rows) + 2 :])


@pytest.mark.parametrize(
    "change, reason",
    [
        pytest.param(
            _set(PixelSpacing=[0, 0]), "PixelSpacing is 0 x 0 mm; spacing must be positive", id="zero spacing"
        ),
        pytest.param(_set(PixelSpacing=[-1, 1]), "spacing must be positive", id="negative spacing"),
        pytest.param(_set(PixelSpacing=["nan", 1]), "PixelSpacing holds a value that is not finite", id="NaN spacing"),
        pytest.param(_set(PixelSpacing=[1]), "PixelSpacing has 1 values; 2 are needed", id="one spacing"),
        pytest.param(
            _set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
            "row and column directions are not orthogonal (dot product 1)",
            id="collinear orientation",
        ),
        pytest.param(
            _set(ImageOrientationPatient=[0] * 6), "row direction has length 0; it must be 1", id="zero orientation"
        ),
        pytest.param(
            _set(ImageOrientationPatient=[1, 0, 0, 0, 2, 0]),
            "column direction has length 2; it must be 1",
            id="non-unit orientation",
        ),
        pytest.param(
            _set(ImageOrientationPatient=[1, 0, 0, 0, "inf", 0]),
            "ImageOrientationPatient holds a value that is not finite",
            id="infinite orientation",
        ),
        pytest.param(
            _set(ImagePositionPatient=[0, 0, "nan"]),
            "ImagePositionPatient holds a value that is not finite",
            id="NaN position",
        ),
        pytest.param(_set(ImagePositionPatient=[0, 0, 0]), "share one position", id="one position for all"),
        pytest.param(_set(Rows=0), "an image needs at least one of each", id="zero rows"),
        pytest.param(_set(Columns=None), "Columns is not an integer", id="empty columns"),
        pytest.param(_set(BitsAllocated=7), "the pixel data cannot be decoded", id="7 bits allocated"),
        pytest.param(_set(BitsStored=40), "the pixel data cannot be decoded", id="more bits stored than allocated"),
        pytest.param(_set(RescaleSlope=0), "RescaleSlope is 0", id="zero rescale slope"),
        pytest.param(_set(RescaleSlope="nan"), "RescaleSlope holds a value that is not finite", id="NaN rescale slope"),
        pytest.param(_set(RescaleSlope=1e38), "voxels that are not finite", id="rescale past float32"),
        pytest.param(_set(NumberOfFrames=2), "multi-frame DICOM images are not supported", id="two frames"),
    ],
)
def test_degenerate_dicom_header_is_refused_naming_what_is_wrong(tmp_path, phantom, change, reason):
    assert reason in _refusal(_series(tmp_path, phantom, change)).reason


def test_element_pydicom_cannot_decode_is_refused_naming_it(tmp_path, phantom):
    folder = _series(tmp_path, phantom)
    _with_rows_of_three_bytes(sorted(folder.iterdir())[2])
    assert "Rows cannot be decoded" in _refusal(folder).reason


def _compressed_garbage(ds) -> None:
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"not RLE" * 9])
    ds["PixelData"].VR = "OB"


def test_undecodable_compressed_pixel_data_is_refused(tmp_path, phantom):
    reason = _refusal(_series(tmp_path, phantom, _compressed_garbage)).reason
    assert "the pixel data cannot be decoded (transfer syntax RLE Lossless)" in reason


def _as_big_endian(ds) -> None:
    pixels = ds.pixel_array
    list(ds)  # every value decoded: pydicom re-encodes a dataset's values, not its raw bytes
    ds.set_original_encoding(False, False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = pixels.astype(">i2").tobytes()


def test_big_endian_series_reads_like_little_endian(tmp_path, phantom):
    little = read_study(_series(tmp_path / "little", phantom), LimitsConfig())
    big = read_study(_series(tmp_path / "big", phantom, _as_big_endian), LimitsConfig())
    np.testing.assert_array_equal(big.array, little.array)
    np.testing.assert_allclose(big.affine, little.affine)


def test_gantry_tilted_series_reads_with_its_slanted_slice_step(tmp_path, phantom):
    # Slices step 3 mm along z and 1.1 mm along y (a 20 degree tilt): not along their normal, but a real grid.
    tilted = phantom.affine.copy()
    tilted[1, 2] = 3.0 * np.tan(np.deg2rad(20))
    folder = _series(tmp_path, Volume(phantom.array, tilted, "CT"))
    volume = read_study(folder, LimitsConfig())
    np.testing.assert_allclose(volume.affine, tilted, atol=1e-5)
    _read(folder)


def test_single_slice_series_reads(tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "000000").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert read_study(folder, LimitsConfig()).shape == (128, 128, 1)
    _read(folder)


def test_flipped_nifti_reads_to_the_same_model_input(tmp_path, phantom):
    # The same image stored with I and K reversed, and its affine saying so: the model sees one image.
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[:3, 3] = np.array(phantom.shape) * [1, 0, 1] - [1, 0, 1]
    as_stored = _read(_nifti(tmp_path / "as-stored", phantom.array, phantom.affine))
    flipped = _read(_nifti(tmp_path / "flipped", phantom.array[::-1, :, ::-1].copy(), phantom.affine @ flip))
    torch.testing.assert_close(flipped, as_stored)


def test_single_slice_nifti_reads(tmp_path):
    _read(_nifti(tmp_path, np.zeros((8, 8, 1), np.int16), np.diag([1.0, 1.0, 5.0, 1.0])))


@pytest.mark.parametrize(
    "shape, affine, reason",
    [
        pytest.param(
            (8, 8, 4),
            np.diag([1.0, 0.0, 1.0, 1.0]),
            "affine has a zero column 1: voxel spacing along axis 1 is 0",
            id="zero sform column",
        ),
        pytest.param(
            (8, 8, 4),
            np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
            "affine cannot be inverted",
            id="parallel sform columns",
        ),
        pytest.param(
            (8, 8, 4),
            np.diag([1.0, np.nan, 1.0, 1.0]),
            "affine holds values that are not finite",
            id="NaN in the sform",
        ),
        pytest.param((8, 8, 0), np.eye(4), "every dimension needs at least one voxel", id="no slices"),
        pytest.param((8, 8, 4, 2), np.eye(4), "a 3D volume is needed", id="4D"),
    ],
)
def test_degenerate_nifti_is_refused_naming_what_is_wrong(tmp_path, shape, affine, reason):
    assert reason in _refusal(_nifti(tmp_path, np.zeros(shape, np.int16), affine)).reason


@pytest.mark.parametrize("spacing", [1e103, 1e-150], ids=["infinite mL", "zero mL"])
def test_nifti2_spacing_no_image_has_is_refused(tmp_path, spacing):
    # NIfTI-2 keeps its affine in float64: three such spacings multiply to a voxel volume float64 cannot hold.
    folder = tmp_path / "upload"
    folder.mkdir()
    image = nib.Nifti2Image(np.zeros((8, 8, 4), np.int16), None)
    image.header.set_sform(np.diag([spacing, spacing, spacing, 1.0]), code=2)
    nib.save(image, folder / "study.nii")
    assert "voxel spacing" in _refusal(folder).reason


def test_nifti2_dimensions_whose_product_overflows_int64_are_over_the_limit(tmp_path):
    image = nib.Nifti2Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = image.to_bytes()
    header = nib.Nifti2Header.from_fileobj(io.BytesIO(raw))
    header["dim"][1:4] = [2**22, 2**21, 2**21]  # 2**64 voxels: numpy's product would wrap to 0
    tmp_path.joinpath("study.nii").write_bytes(header.binaryblock + raw[len(header.binaryblock) :])
    with pytest.raises(PayloadTooLarge, match="over this server's limit"):
        read_study(tmp_path, LimitsConfig())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nifti_with_non_finite_voxels_is_refused_with_their_count(tmp_path, value):
    array = np.zeros((8, 8, 4), np.float32)
    array[1, 2, 3] = array[4, 5, 0] = value
    assert "has 2 voxels that are not finite (NaN or infinity)" in _refusal(_nifti(tmp_path, array, np.eye(4))).reason
