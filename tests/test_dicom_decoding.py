"""Decoding what PACS really send: pydicom's and pydicom-data's sample files in every transfer syntax the server
decodes, a syntax it does not (415, named, before any pixel is read), real series in any file order, and enhanced
multi-frame CT/MR images placed by their functional groups. Real files throughout; no Ray."""

import copy
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML, JPEGExtended12Bit, JPEGLosslessSV1, RLELossless

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, RequestError, UnsupportedMediaType
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.dicom_source import SourceFrame
from serve_app.studies.reader import read_study
from serve_app.studies.volume import Volume

# pydicom warns about odd values in its own samples (a DS with too many digits, say): what is tested is the outcome.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MR_VARIANTS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
]
EMRI_VARIANTS = [
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_big_endian.dcm",
]
# Secondary captures: real compressed pixel data, but no place in patient space.
WITHOUT_GEOMETRY = ["JPEG-lossy.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "JPEG-LL.dcm"]


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom-data is a test dependency)"
    return Path(path)


def _upload(tmp_path: Path, *files: Path) -> Path:
    """An upload folder holding ``files`` under the names the ingress gives them (their contents say what they are)."""
    folder = tmp_path / "upload"
    folder.mkdir(parents=True)
    for k, path in enumerate(files):
        shutil.copy(path, folder / f"{k:06d}")
    return folder


def _zipped_upload(tmp_path: Path, *files: Path) -> Path:
    """An upload folder holding one zip archive of ``files``, stored uncompressed (as a PACS exports): the server
    reads them where they lie in it."""
    folder = tmp_path / "zipped"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "000000", "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, path.name)
    return folder


def _refusal(paths: list[Path]) -> RequestError:
    with pytest.raises(RequestError) as refused:
        read_dicom_series(paths, LimitsConfig())
    return refused.value


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_every_encoding_of_one_mr_slice_reads_to_the_same_volume(tmp_path, name):
    reference = read_dicom_series([_sample("MR_small.dcm")], LimitsConfig())
    volume = read_study(_upload(tmp_path, _sample(name)), LimitsConfig())
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)
    assert volume.modality == "MR"
    assert volume.source.slices == [SourceFrame(0)] and "PixelData" not in volume.source.instances[0]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_every_encoding_reads_alike_from_inside_a_stored_zip_without_unpacking(tmp_path, name):
    from_file = read_study(_upload(tmp_path, _sample(name)), LimitsConfig())
    folder = _zipped_upload(tmp_path, _sample("MR_small.dcm"), _sample(name))  # the entry read is not the first
    with pytest.raises(InvalidStudy, match="2 different series|share one position"):
        read_study(folder, LimitsConfig())  # both entries were read
    (folder / "000000").unlink()
    shutil.rmtree(folder / "000000.unzipped")
    folder = _zipped_upload(tmp_path / "alone", _sample(name))
    in_place = read_study(folder, LimitsConfig())
    np.testing.assert_array_equal(in_place.array, from_file.array)
    np.testing.assert_allclose(in_place.affine, from_file.affine)
    assert in_place.source.headers == from_file.source.headers
    assert not any((folder / "000000.unzipped").iterdir())


def test_ct_slices_read_in_hounsfield_units():
    for name, expected in (("CT_small.dcm", (128, 128, 1)), ("693_J2KI.dcm", (512, 512, 1))):
        path = _sample(name)
        ds = pydicom.dcmread(path)
        volume = read_dicom_series([path], LimitsConfig())
        assert volume.shape == expected
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, 0], hu.T)


def _placed(ds: Dataset) -> Dataset:
    """``ds`` with an axial position, orientation and spacing, its pixel data as encoded."""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = ds.get("PixelSpacing") or [1, 1]
    return ds


@pytest.mark.parametrize("name", WITHOUT_GEOMETRY)
def test_secondary_captures_are_refused_for_their_geometry_but_their_pixels_decode(tmp_path, name):
    path = _sample(name)
    assert "a DICOM image lacks" in _refusal([path]).reason
    ds = _placed(pydicom.dcmread(path))
    ds.save_as(tmp_path / "placed.dcm")
    volume = read_dicom_series([tmp_path / "placed.dcm"], LimitsConfig())
    assert volume.shape == (ds.Columns, ds.Rows, 1)
    assert np.ptp(volume.array) > 0  # real values, not a blank


def test_jpeg_lossless_decodes_like_gdcm_with_imagecodecs_too():
    # 12-bit JPEG Extended has no decoder but the imagecodecs plugin; on lossless data both must agree.
    path = _sample("JPEG-LL.dcm")
    by_gdcm = pydicom.pixels.pixel_array(path, decoding_plugin="gdcm")
    np.testing.assert_array_equal(pydicom.pixels.pixel_array(path, decoding_plugin="imagecodecs"), by_gdcm)
    assert pydicom.pixels.pixel_array(_sample("JPGExtended.dcm")).max() > 255  # 12 bits, not 8
    assert pydicom.dcmread(_sample("JPGExtended.dcm")).file_meta.TransferSyntaxUID == JPEGExtended12Bit


def test_a_colour_jpeg_lossless_image_is_left_by_the_imagecodecs_plugin_to_the_next_one():
    # pydicom tries its plugins in turn; ours refuses colour (it would convert the colour space), and GDCM decodes it.
    path = _sample("SC_rgb_jpeg_gdcm.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    with pytest.raises(RuntimeError, match="grey-scale JPEG only"):
        pydicom.pixels.pixel_array(path, decoding_plugin="imagecodecs")
    np.testing.assert_array_equal(
        pydicom.pixels.pixel_array(path), pydicom.pixels.pixel_array(path, decoding_plugin="gdcm")
    )


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_colour_files_are_refused_as_colour(name):
    refusal = _refusal([_sample(name)])
    assert refusal.status_code == 422 and "not grey-scale" in refusal.reason


def test_a_syntax_no_decoder_reads_is_a_415_naming_it_before_any_pixel_is_read(tmp_path):
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"not video"])  # were it decoded, this would be a 422
    ds.save_as(tmp_path / "mpeg.dcm")
    refusal = _refusal([tmp_path / "mpeg.dcm"])
    assert isinstance(refusal, UnsupportedMediaType) and refusal.status_code == 415
    assert "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100)" in refusal.reason


def test_an_unknown_private_syntax_is_a_415_naming_its_uid(tmp_path):
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    ds.save_as(tmp_path / "private.dcm")
    refusal = _refusal([tmp_path / "private.dcm"])
    assert refusal.status_code == 415 and "1.2.3.4.5.6 (unknown)" in refusal.reason
    assert "CompressedSamples" not in refusal.reason  # the patient's name is never echoed


def test_pixel_data_a_known_syntax_cannot_decode_stays_a_422(tmp_path):
    ds = pydicom.dcmread(_sample("MR_small_RLE.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"not RLE" * 9])
    ds.save_as(tmp_path / "broken.dcm")
    refusal = _refusal([tmp_path / "broken.dcm"])
    assert isinstance(refusal, InvalidStudy)
    assert "the pixel data cannot be decoded (transfer syntax RLE Lossless)" in refusal.reason


def _ct5n() -> list[Path]:
    folder = _sample("CT_small.dcm").parent / "dicomdirtests" / "98892001" / "CT5N"
    return sorted(folder.iterdir())


def test_a_real_series_reads_the_same_in_any_file_order():
    paths = _ct5n()
    in_order = read_dicom_series(paths, LimitsConfig())
    shuffled = list(paths)
    random.Random(10).shuffle(shuffled)
    for order in (shuffled, paths[::-1]):
        volume = read_dicom_series(order, LimitsConfig())
        np.testing.assert_array_equal(volume.array, in_order.array)
        np.testing.assert_array_equal(volume.affine, in_order.affine)
    assert in_order.shape[2] == len(paths) == 5
    # slices[k] is the instance of slice k: its position is that slice's origin, in increasing order along the normal.
    normal = np.cross(*np.reshape([float(v) for v in in_order.source.instances[0].ImageOrientationPatient], (2, 3)))
    positions = [
        np.asarray(in_order.source.instances[s.instance].ImagePositionPatient, float) for s in in_order.source.slices
    ]
    assert np.all(np.diff([p @ normal for p in positions]) > 0)
    lps_origins = [(np.diag([-1, -1, 1, 1]) @ in_order.affine @ [0, 0, k, 1])[:3] for k in range(5)]
    np.testing.assert_allclose(lps_origins, positions, atol=1e-4)
    uids = [in_order.source.instances[s.instance].SOPInstanceUID for s in in_order.source.slices]
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(in_order.array[:, :, uids.index(ds.SOPInstanceUID)], hu.T)


def test_a_compressed_series_reads_like_the_uncompressed_one(tmp_path):
    phantom = ct_phantom(np.random.default_rng(4), shape=(24, 20, 6), spacing=(1.5, 1.25, 3.0)).volume
    plain = write_ct_series(phantom, tmp_path / "plain")
    for path in plain:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / path.name)
    compressed = sorted(tmp_path.glob("*.dcm"))
    expected = read_dicom_series(plain, LimitsConfig())
    volume = read_dicom_series(compressed[::-1], LimitsConfig())
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_array_equal(volume.affine, expected.affine)


def test_twelve_bit_values_with_garbage_in_the_unused_bits_read_as_pydicom_reads_them(tmp_path):
    phantom = ct_phantom(np.random.default_rng(6), shape=(16, 12, 3), spacing=(1.0, 1.0, 2.0)).volume
    paths = write_ct_series(phantom, tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = (ds.pixel_array.astype(np.int16) & 0x0FFF) | 0x5000  # garbage above the 12 stored bits
        ds.BitsStored, ds.HighBit, ds.PixelData = 12, 11, stored.tobytes()
        ds.save_as(path)
    volume = read_dicom_series(paths, LimitsConfig())
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(volume.array[:, :, k], (ds.pixel_array + float(ds.RescaleIntercept)).T)


def _rewritten(paths: list[Path], **elements) -> list[Path]:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


@pytest.mark.parametrize(
    ("elements", "dtype"),
    [
        pytest.param({}, np.int16, id="CT's integer intercept: int16, as NIfTI's CT"),
        pytest.param({"RescaleIntercept": -1024.5}, np.float32, id="a fractional intercept"),
        pytest.param({"RescaleSlope": 2}, np.float32, id="a slope"),
        pytest.param({"RescaleIntercept": 32000}, np.float32, id="shifted past int16"),
    ],
)
def test_a_series_whose_rescale_shifts_integers_reads_as_int16_else_float32(tmp_path, elements, dtype):
    phantom = ct_phantom(np.random.default_rng(7), shape=(16, 12, 3), spacing=(1.0, 1.0, 2.0)).volume
    paths = _rewritten(write_ct_series(phantom, tmp_path), **elements)
    volume = read_dicom_series(paths, LimitsConfig())
    assert volume.array.dtype == dtype
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, k], hu.T.astype(np.float32))


@pytest.mark.parametrize(
    "offset",
    [
        pytest.param(2000, id="unsigned values within int16"),
        pytest.param(40000, id="unsigned values over 32767, an intercept outside int16"),
    ],
)
def test_unsigned_values_that_their_intercept_brings_into_int16_read_as_int16(tmp_path, offset):
    phantom = ct_phantom(np.random.default_rng(8), shape=(16, 12, 3), spacing=(1.0, 1.0, 2.0)).volume
    paths = write_ct_series(phantom, tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = (ds.pixel_array.astype(np.int32) + offset).astype(np.uint16)
        ds.PixelRepresentation, ds.RescaleIntercept = 0, float(ds.RescaleIntercept) - offset
        ds.PixelData = stored.tobytes()
        ds.save_as(path)
    volume = read_dicom_series(paths, LimitsConfig())
    assert volume.array.dtype == np.int16
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(volume.array[:, :, k], (ds.pixel_array + float(ds.RescaleIntercept)).T)


# Enhanced (multi-frame) images.


def test_enhanced_ct_is_placed_by_its_functional_groups():
    path = _sample("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = read_dicom_series([path], LimitsConfig())
    assert volume.shape == (512, 512, 2) and volume.modality == "CT"
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    # Slices in order along the normal (row x column direction), which is frame 2 before frame 1 here.
    assert volume.source.slices == [SourceFrame(0, 2), SourceFrame(0, 1)]
    origin_lps = (np.diag([-1, -1, 1, 1]) @ volume.affine)[:3, 3]
    np.testing.assert_allclose(origin_lps, positions[1], atol=1e-4)
    spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert volume.spacing == pytest.approx((spacing[1], spacing[0], np.linalg.norm(positions[0] - positions[1])))
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[:, :, 0], hu[1].T)
    np.testing.assert_array_equal(volume.array[:, :, 1], hu[0].T)
    assert "PixelData" not in volume.source.instances[0]


def _with_functional_groups(ds: Dataset, positions: list[list[float]], **frame_content) -> Dataset:
    """``ds`` (a multi-frame image) with shared orientation, spacing and rescale, and per-frame positions; each of
    ``frame_content``'s lists gives a FrameContentSequence element per frame."""
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.8, 0.6]
    shared.PixelMeasuresSequence[0].SliceThickness = 2.0
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    per_frame = []
    for i, position in enumerate(positions):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = position
        item.FrameContentSequence = Sequence([Dataset()])
        for keyword, values in frame_content.items():
            setattr(item.FrameContentSequence[0], keyword, values[i])
        per_frame.append(item)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def _frame_positions(frames: int, step: float = 2.0) -> list[list[float]]:
    """Coronal frames stepping along -y (the normal of rows +x, columns -z), shuffled: the file's order is not the
    slices'."""
    positions = [[10.0, 5.0 - step * k, -20.0] for k in range(frames)]
    random.Random(frames).shuffle(positions)
    return positions


def _enhanced_copy(folder: Path, name: str) -> Path:
    """pydicom-data's ``name`` (an enhanced MR stripped of its functional groups) given them back, as written into
    ``folder``; its pixel data stays as encoded."""
    folder.mkdir()
    ds = _with_functional_groups(pydicom.dcmread(_sample(name)), _frame_positions(10))
    ds.save_as(folder / name)
    return folder / name


@pytest.mark.parametrize("name", EMRI_VARIANTS)
def test_every_encoding_of_an_enhanced_mr_reads_to_the_same_volume(tmp_path, name):
    reference, volume = (
        read_study(_upload(tmp_path / role, _enhanced_copy(tmp_path / role, variant)), LimitsConfig())
        for role, variant in (("reference", "emri_small.dcm"), ("variant", name))
    )
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.shape == (64, 64, 10) and volume.modality == "MR"
    assert volume.spacing == pytest.approx((0.6, 0.8, 2.0))
    # Slice k is the frame at the k-th position along the normal, and holds that frame's pixels, rescaled.
    positions = _frame_positions(10)
    normal = np.cross([1, 0, 0], [0, 0, -1])
    order = sorted(range(10), key=lambda i: float(np.dot(positions[i], normal)))
    assert volume.source.slices == [SourceFrame(0, i + 1) for i in order]
    pixels = pydicom.dcmread(_sample("emri_small.dcm")).pixel_array
    for k, i in enumerate(order):
        np.testing.assert_array_equal(volume.array[:, :, k], (pixels[i] * 2.0 - 100).T)
    np.testing.assert_allclose((np.diag([-1, -1, 1, 1]) @ volume.affine)[:3, 3], positions[order[0]])
    # The same image inside a stored zip is read where it lies, whole (its deferred elements cannot be reopened).
    in_place = read_study(_zipped_upload(tmp_path / "zip", tmp_path / "variant" / name), LimitsConfig())
    np.testing.assert_array_equal(in_place.array, volume.array)
    assert in_place.source.slices == volume.source.slices and in_place.source.headers == volume.source.headers


@pytest.mark.parametrize(
    "positions, content, reason",
    [
        pytest.param(
            _frame_positions(10),
            {"StackID": ["1"] * 5 + ["2"] * 5},
            "holds 2 stacks (StackID)",
            id="two stacks",
        ),
        pytest.param(
            _frame_positions(5) * 2,
            {"TemporalPositionIndex": [1] * 5 + [2] * 5},
            "holds 2 temporal positions (TemporalPositionIndex)",
            id="two times",
        ),
        pytest.param(
            [[10.0, -step, -20.0] for step in (0, 2, 4, 6, 8, 10, 12, 14, 16, 30)],
            {},
            "the slice spacing is uneven",
            id="uneven",
        ),
        pytest.param(_frame_positions(5) * 2, {}, "share one position", id="two frames a position"),
    ],
)
def test_an_enhanced_image_that_is_not_one_stack_is_refused(tmp_path, positions, content, reason):
    ds = _with_functional_groups(pydicom.dcmread(_sample("emri_small.dcm")), positions, **content)
    ds.save_as(tmp_path / "mr.dcm")
    refusal = _refusal([tmp_path / "mr.dcm"])
    assert refusal.status_code == 422 and reason in refusal.reason


def test_a_multi_frame_image_without_functional_groups_is_refused():
    refusal = _refusal([_sample("emri_small.dcm")])
    assert refusal.status_code == 422 and "multi-frame DICOM images are not supported without functional groups" in (
        refusal.reason
    )


def test_a_legacy_converted_enhanced_ct_reads_like_its_series(tmp_path):
    phantom = ct_phantom(np.random.default_rng(7), shape=(20, 16, 8), spacing=(1.5, 1.25, 3.0)).volume
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = phantom.affine.copy()
    affine[:3, :3] = rotation @ affine[:3, :3]
    paths = write_ct_series(Volume(phantom.array, affine, "CT"), tmp_path / "series")
    series = [pydicom.dcmread(p) for p in paths]
    random.Random(1).shuffle(series)
    enhanced = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[copy.deepcopy(ds) for ds in series],
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    expected = read_dicom_series(paths, LimitsConfig())
    volume = read_dicom_series([tmp_path / "enhanced.dcm"], LimitsConfig())
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-5)
    assert volume.modality == "CT"
    # Each slice's frame is the one converted from that slice's file.
    frames = pydicom.dcmread(tmp_path / "enhanced.dcm").PerFrameFunctionalGroupsSequence
    for k, source_frame in enumerate(volume.source.slices):
        position = frames[source_frame.frame - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], expected.source.instances[k].ImagePositionPatient)
