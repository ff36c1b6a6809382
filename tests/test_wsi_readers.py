"""The slide readers on files made by third-party tools: an Aperio SVS of real H&E written by tifffile (with its
thumbnail, label and macro pages) and a generic tiled pyramid, each read by tifffile and OpenSlide; DICOM WSI made
from the SVS by Orthanc's OrthancWSIDicomizer (TILED_SPARSE, one instance per level or concatenated) and by wsidicom
(TILED_FULL, a level left out), read by wsidicom and OpenSlide. Every pair of readers gives the same pixels within
JPEG decoder tolerance; the factory says which reader and why, and refuses what is not a slide with one reason.
Last, a WSI job over the SVS, the DICOM WSI folder made of it, and the same DICOM WSI on Orthanc read over DICOMweb,
its tiles and tumour regions stored back to Orthanc as Microscopy Bulk Simple Annotations and its heatmap as a
Parametric Map, both read back from there; and PACS a tenant may not name."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from helpers import assert_no_markers_in_logs, skip_unless_installed, wait_for_job
from serve_app.errors import InvalidSlide
from serve_app.samples.synthetic_slides import (
    LABEL_SHAPE,
    MACRO_SHAPE,
    WrittenSlide,
    write_slide,
    write_slide_from_region,
)
from serve_app.wsi.slides import Slide, open_slide

WIDTH, HEIGHT, MPP, TILE, LEVELS = 2000, 1400, 0.5, 256, 3
JOB_SLIDE = (1500, 1100)  # (width, height): the WSI job's slide, small to keep the job short
# Decoders of one JPEG stream may differ by their IDCT's rounding (libjpeg-turbo's builds in tifffile's imagecodecs,
# OpenSlide's wheel and pydicom's plugins): a few grey levels at most, none on average.
JPEG_MAX_DIFFERENCE, JPEG_MEAN_DIFFERENCE = 8, 0.5
REGIONS = [
    (0, (0, 0, WIDTH, HEIGHT)),  # the whole level
    (0, (-40, -30, 517, 333)),  # past the top-left corner: white there
    (1, (250, 100, 700, 900)),  # another level, past its bottom edge
    (2, (400, 250, 100, 100)),  # the coarsest level's bottom-right corner
]
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
# OrthancWSIDicomizer's --dataset: what a lab's dicomizer adds to each instance (the image type is a type 1 attribute
# that OrthancWSIDicomizer leaves to it). Synthetic identifiers only.
DICOMIZER_DATASET = {
    "PatientID": "SYNTHETIC-31",
    "PatientName": "SYNTHETIC^SLIDE",
    "ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
    "FocusMethod": "AUTO",
    "ExtendedDepthOfField": "NO",
    "SpecimenLabelInImage": "NO",
    "BurnedInAnnotation": "NO",
}


def _dicomizer() -> str:
    path = shutil.which("OrthancWSIDicomizer")
    if path is None:
        skip_unless_installed("OrthancWSIDicomizer", "OrthancWSIDicomizer is not installed (Debian: orthanc-wsi)")
    return path


def dicomize(svs: WrittenSlide, folder: Path, *, max_size_mb: int = 0, dataset: dict | None = DICOMIZER_DATASET):
    """``svs`` turned into DICOM WSI instances in ``folder`` by OrthancWSIDicomizer, its JPEG tiles copied as they are.

    The image lies rotated on the slide (Image Orientation (Slide) 0\\-1\\0\\-1\\0\\0), so the imaged volume's
    width runs along the image's rows: that is what sets the pixel spacing to the slide's mpp.
    """
    folder.mkdir(parents=True)
    command = [_dicomizer(), "--folder", str(folder), "--compression", "jpeg", "--max-size", str(max_size_mb)]
    height, width = svs.level_shapes[0]
    command += ["--imaged-width", f"{height * svs.mpp / 1000:g}", "--imaged-height", f"{width * svs.mpp / 1000:g}"]
    if dataset is not None:
        dataset_path = folder.with_suffix(".json")
        dataset_path.write_text(json.dumps(dataset))
        command += ["--dataset", str(dataset_path)]
    subprocess.run([*command, str(svs.path)], check=True, capture_output=True, timeout=60)
    return folder


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> WrittenSlide:
    """An Aperio SVS by tifffile of the real H&E of ``wsidicom-data``; at quality 95 level 0 is over 1 MB, so that a
    1 MB limit splits it in two."""
    path = tmp_path_factory.mktemp("svs") / "case.svs"
    return write_slide_from_region(
        path, WIDTH, HEIGHT, mpp=MPP, tile=TILE, levels=LEVELS, quality=95, label_and_macro=True
    )


@pytest.fixture(scope="module")
def svs_levels(svs) -> list[np.ndarray]:
    """Every level of the SVS as tifffile reads it whole: the reference pixels."""
    return [tifffile.imread(svs.path, series=0, level=k) for k in range(LEVELS)]


@pytest.fixture(scope="module")
def dicom_sparse(svs, tmp_path_factory) -> Path:
    """OrthancWSIDicomizer's DICOM WSI: TILED_SPARSE, one instance per level."""
    return dicomize(svs, tmp_path_factory.mktemp("dicom") / "sparse")


@pytest.fixture(scope="module")
def dicom_concatenated(svs, tmp_path_factory) -> Path:
    """OrthancWSIDicomizer's DICOM WSI with instances of at most 1 MB: level 0 is a concatenation of two."""
    return dicomize(svs, tmp_path_factory.mktemp("dicom") / "concatenated", max_size_mb=1)


@pytest.fixture(scope="module")
def dicom_full(dicom_sparse, tmp_path_factory) -> Path:
    """The same slide saved by wsidicom: TILED_FULL (frames in row-major order, no per-frame positions)."""
    from wsidicom import WsiDicom

    folder = tmp_path_factory.mktemp("dicom") / "full"
    folder.mkdir()
    with WsiDicom.open(dicom_sparse) as wsi:
        wsi.save(folder, include_labels=False, include_overviews=False, include_thumbnails=False)
    return folder


def _instances(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]


def _assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= JPEG_MAX_DIFFERENCE and difference.mean() <= JPEG_MEAN_DIFFERENCE, (
        difference.max(),
        difference.mean(),
    )


def _assert_reads_the_svs(slide: Slide, svs_levels: list[np.ndarray], regions=REGIONS) -> None:
    """``slide`` has the SVS's pyramid and, region by region, its pixels (white outside)."""
    assert [(level.height, level.width) for level in slide.levels] == [level.shape[:2] for level in svs_levels]
    assert [level.mpp for level in slide.levels] == pytest.approx([MPP, 2 * MPP, 4 * MPP], rel=1e-5)
    for level, (x, y, width, height) in regions:
        region = slide.read_region(level, x, y, width, height)
        expected = np.full((height, width, 3), 255, np.uint8)
        inside = svs_levels[level][max(y, 0) : y + height, max(x, 0) : x + width]
        expected[max(-y, 0) : max(-y, 0) + inside.shape[0], max(-x, 0) : max(-x, 0) + inside.shape[1]] = inside
        _assert_same_pixels(region, expected)


# --- Aperio SVS: tifffile and OpenSlide ---------------------------------------------------------------------------


def test_the_svs_is_aperio_with_thumbnail_label_and_macro_to_openslide_and_tifffile(svs):
    assert openslide.OpenSlide.detect_format(str(svs.path)) == "aperio"
    with openslide.OpenSlide(str(svs.path)) as reference:
        assert float(reference.properties[openslide.PROPERTY_NAME_MPP_X]) == MPP
        sizes = {name: image.size for name, image in reference.associated_images.items()}
        assert sizes == {
            "thumbnail": svs.thumbnail_shape[::-1],
            "label": LABEL_SHAPE[::-1],
            "macro": MACRO_SHAPE[::-1],
        }
    with tifffile.TiffFile(svs.path) as tif:
        assert tif.is_svs and [series.name for series in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]


def test_the_svs_opens_with_tifffile_and_says_why_and_its_levels_leave_out_the_associated_images(svs):
    with open_slide(svs.path) as slide:
        assert slide.reader == "tifffile"
        assert "Aperio SVS" in slide.reader_reason and slide.reader_notes == ()
        assert [(level.height, level.width) for level in slide.levels] == list(svs.level_shapes)


@pytest.mark.parametrize("reader", ["tifffile", "openslide"])
def test_tifffile_and_openslide_read_the_same_svs_pixels(svs, svs_levels, reader):
    with open_slide(svs.path, reader=reader) as slide:
        assert slide.reader == reader
        _assert_reads_the_svs(slide, svs_levels)


def test_a_generic_tiled_pyramid_reads_the_same_in_tifffile_and_openslide(svs_levels, tmp_path):
    """Levels as pages of the main IFD chain, the reduced ones marked so (NewSubfileType 1), as OpenSlide's
    generic-tiff wants them, with their resolution in pixels per centimetre."""
    path = tmp_path / "generic.tif"
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(svs_levels):
            tif.write(
                level,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subfiletype=1 if k else 0,
                resolution=(1e4 / (MPP * 2**k),) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with open_slide(path) as by_tifffile, open_slide(path, reader="openslide") as by_openslide:
        assert by_tifffile.reader == "tifffile" and "tiled pyramidal TIFF" in by_tifffile.reader_reason
        assert by_openslide.levels == by_tifffile.levels
        for level in by_tifffile.levels:
            box = (level.index, -10, -10, level.width + 20, level.height + 20)
            _assert_same_pixels(by_openslide.read_region(*box), by_tifffile.read_region(*box))


# --- DICOM WSI: wsidicom and OpenSlide --------------------------------------------------------------------------


def test_orthanc_dicomizer_writes_tiled_sparse_instances_and_a_concatenation(dicom_sparse, dicom_concatenated):
    sparse = _instances(dicom_sparse)
    assert len(sparse) == LEVELS and {ds.SOPClassUID for ds in sparse} == {WSI_SOP_CLASS}
    assert all("PerFrameFunctionalGroupsSequence" in ds and "ConcatenationUID" not in ds for ds in sparse)
    concatenated = _instances(dicom_concatenated)
    level0 = [ds for ds in concatenated if ds.TotalPixelMatrixColumns == WIDTH]
    assert len(level0) == 2 and len({ds.ConcatenationUID for ds in level0}) == 1
    assert sorted(int(ds.InConcatenationNumber) for ds in level0) == [1, 2]


def test_wsidicom_writes_tiled_full(dicom_full):
    instances = _instances(dicom_full)
    assert len(instances) == LEVELS
    assert {ds.DimensionOrganizationType for ds in instances} == {"TILED_FULL"}


@pytest.mark.parametrize(
    ("layout", "reader"),
    [("sparse", "wsidicom"), ("sparse", "openslide"), ("full", "wsidicom"), ("full", "openslide")]
    + [("concatenated", "wsidicom")],
)
def test_wsidicom_and_openslide_read_the_dicom_wsi_as_the_svs(request, svs_levels, layout, reader):
    folder = request.getfixturevalue(f"dicom_{layout}")
    with open_slide(folder, reader=reader) as slide:
        assert slide.reader == reader and slide.path == folder
        _assert_reads_the_svs(slide, svs_levels)


def test_openslide_refuses_orthancs_concatenations_of_one_instance_and_wsidicom_reads_them(dicom_concatenated):
    """With --max-size, OrthancWSIDicomizer makes every level a concatenation, most of one instance: OpenSlide 4
    refuses those ("only one SOP instance in concatenation"), wsidicom reads them, and the factory picks wsidicom."""
    with pytest.raises(InvalidSlide, match="OpenSlideError"):
        open_slide(dicom_concatenated, reader="openslide")
    with open_slide(dicom_concatenated) as slide:
        assert slide.reader == "wsidicom"


def test_a_dicom_wsi_folder_opens_with_wsidicom_and_says_why(dicom_sparse):
    with open_slide(dicom_sparse) as slide:
        assert slide.reader == "wsidicom"
        assert "DICOM WSI" in slide.reader_reason and slide.reader_notes == ()


def test_a_level_missing_from_the_dicom_pyramid_leaves_a_gap_in_the_downsamples(dicom_sparse, svs_levels, tmp_path):
    from wsidicom import WsiDicom

    folder = tmp_path / "no-level-1"
    folder.mkdir()
    with WsiDicom.open(dicom_sparse) as wsi:
        wsi.save(folder, include_levels=[0, 2], include_labels=False, include_overviews=False)
    with open_slide(folder) as slide:
        assert [level.downsample for level in slide.levels] == pytest.approx([1, 4])
        _assert_same_pixels(slide.read_region(1, 0, 0, *svs_levels[2].shape[1::-1]), svs_levels[2])


def _on_pacs(app_config, study_instance_uid: str, series_instance_uid: str):
    from serve_app.wsi.slides import DicomwebSlide

    return DicomwebSlide("main", app_config.pacs["main"], study_instance_uid, series_instance_uid)


def test_wsidicom_reads_the_dicom_wsi_from_the_pacs_over_dicomweb_as_the_svs(
    orthanc, app_config, dicom_sparse, svs_levels
):
    """OrthancWSIDicomizer's instances stored to Orthanc, read back by series UID: the SVS's levels and pixels."""
    stowed = _stowed(orthanc, dicom_sparse)
    with open_slide(_on_pacs(app_config, stowed["study_instance_uid"], stowed["series_instance_uid"])) as slide:
        assert slide.reader == "wsidicom" and "PACS main" in slide.reader_reason and slide.reader_notes == ()
        _assert_reads_the_svs(slide, svs_levels, REGIONS[1:])  # not all of level 0: a request per frame
        assert slide.dicom_source().SOPInstanceUID in {ds.SOPInstanceUID for ds in _instances(dicom_sparse)}


def test_a_series_the_pacs_does_not_have_is_refused_naming_the_pacs(orthanc, app_config):
    with pytest.raises(InvalidSlide, match="PACS main has no such study or series|series on PACS main holds no"):
        open_slide(_on_pacs(app_config, "1.2.3", "1.2.3.4"))


def _copies(folder: Path, target: Path, change) -> Path:
    """``folder``'s instances and two altered copies of each (new UIDs): more focal planes or optical paths."""
    shutil.copytree(folder, target)
    for path in sorted(folder.glob("*.dcm")):
        for copy in (1, 2):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            change(ds, copy)
            ds.save_as(target / f"copy{copy}-{path.name}")
    return target


def _focal_plane(ds: pydicom.Dataset, copy: int) -> None:
    for frame in ds.PerFrameFunctionalGroupsSequence:
        frame.PlanePositionSlideSequence[0].ZOffsetInSlideCoordinateSystem = str(2.0 * copy)


def _optical_path(ds: pydicom.Dataset, copy: int) -> None:
    ds.OpticalPathSequence[0].OpticalPathIdentifier = str(copy + 1)
    ds.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence[0].OpticalPathIdentifier = str(copy + 1)


@pytest.mark.parametrize(
    ("change", "note"),
    [
        (_focal_plane, "3 focal planes (0, 2, 4 µm); the first, z = 0 µm, is read"),
        (_optical_path, "3 optical paths ('1', '2', '3'); the first, '1', is read"),
    ],
)
def test_of_several_focal_planes_or_optical_paths_the_first_is_read_and_the_summary_says_so(
    dicom_sparse, svs_levels, tmp_path, change, note
):
    with open_slide(_copies(dicom_sparse, tmp_path / "slide", change)) as slide:
        assert slide.reader == "wsidicom" and len(slide.reader_notes) == 1 and note in slide.reader_notes[0]
        _assert_same_pixels(slide.read_region(0, 0, 0, 400, 300), svs_levels[0][:300, :400])


# --- a one-level slide: its low-resolution image made in bands ----------------------------------------------------


def test_a_one_level_slide_of_6000_px_gets_its_tissue_and_thumbnail_from_level_0_read_in_bands(
    svs_levels, tmp_path, monkeypatch
):
    """A scanner export of one 6000 x 4200 level (the SVS's H&E, 3 x 3): opened, with a note; tissue detection and
    the thumbnail read level 0 band by band, never whole (bands of 1 Mpx here, to see the bound on a small slide),
    and give what reading it whole gives."""
    import tracemalloc

    from serve_app.wsi.readers import slide as slide_module
    from serve_app.wsi.tissue import detect_tissue

    whole = np.tile(svs_levels[0], (3, 3, 1))
    path = tmp_path / "one-level.tif"
    tifffile.imwrite(
        path,
        whole,
        tile=(TILE, TILE),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 95},
        resolution=(1e4 / MPP,) * 2,
        resolutionunit="CENTIMETER",
    )
    decoded = tifffile.imread(path)
    monkeypatch.setattr(slide_module, "BAND_PIXELS", 1 << 20)
    with open_slide(path) as slide:
        assert len(slide.levels) == 1 and (slide.levels[0].width, slide.levels[0].height) == (6000, 4200)
        assert len(slide.reader_notes) == 1 and "one resolution level (6000x4200 px)" in slide.reader_notes[0]
        tracemalloc.start()
        try:
            tissue = detect_tissue(slide)
            tissue_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            thumbnail = slide.thumbnail(2048)
            thumbnail_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # The level is 76 MB whole, a band 3 MB. The thumbnail is made from level 0 reduced by a whole factor, here
        # halved (19 MB; at most twice the thumbnail's side whatever the slide's size), then resized.
        assert tissue_peak < decoded.nbytes / 10, (tissue_peak, decoded.nbytes)
        assert thumbnail_peak < decoded.nbytes / 2, (thumbnail_peak, decoded.nbytes)
        factor = 16  # 8 µm per pixel of the mask at 0.5 mpp
        assert tissue.mpp == MPP * factor and tissue.mask.shape == (-(-4200 // factor), 6000 // factor)
        assert 0.05 < tissue.tissue_fraction < 0.95
        reference = np.full((4208, 6000, 3), 255, np.uint8)  # whole, padded with glass to a multiple of 16 rows
        reference[:4200] = decoded
        reduced = slide_module.read_level_reduced(slide, 0, factor)
        assert np.array_equal(reduced[:, :375], np.asarray(Image.fromarray(reference).reduce(factor))[:, :375])
        assert thumbnail.shape == (1434, 2048, 3)


# --- refusals: one reason each ----------------------------------------------------------------------------------


def test_an_empty_file_says_the_file_is_empty(tmp_path):
    path = tmp_path / "copy-failed.svs"
    path.touch()
    with pytest.raises(InvalidSlide, match="file is empty"):
        open_slide(path)


def test_a_folder_that_is_empty_or_holds_no_dicom_is_refused(tmp_path, svs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidSlide, match="folder is empty"):
        open_slide(empty)
    other = tmp_path / "svs-folder"
    other.mkdir()
    shutil.copy(svs.path, other)
    with pytest.raises(InvalidSlide, match="holds no DICOM files"):
        open_slide(other)


def test_a_dicom_file_that_is_not_a_slide_says_what_it_is(tmp_path):
    with pytest.raises(InvalidSlide, match="not a whole-slide image.*CT Image Storage"):
        open_slide(Path(get_testdata_file("CT_small.dcm")))
    folder = tmp_path / "ct-series"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder)
    with pytest.raises(InvalidSlide, match="no DICOM whole-slide image levels.*OpenSlide could not read it either"):
        open_slide(folder)


def test_one_instance_of_a_dicom_wsi_is_refused_for_its_folder(dicom_sparse):
    with pytest.raises(InvalidSlide, match="name the folder"):
        open_slide(sorted(dicom_sparse.iterdir())[0])


def test_instances_without_their_image_type_are_refused_by_both_dicom_readers(svs, tmp_path):
    """OrthancWSIDicomizer leaves the image type (type 1) to its --dataset: without one, no reader finds a level."""
    folder = dicomize(svs, tmp_path / "no-image-type", dataset=None)
    with pytest.raises(InvalidSlide, match="no DICOM whole-slide image levels"):
        open_slide(folder)


@pytest.mark.parametrize(("reader", "target"), [("wsidicom", "file"), ("tifffile", "folder"), ("cucim", "folder")])
def test_a_reader_named_for_what_it_does_not_read_is_refused(svs, dicom_sparse, reader, target):
    with pytest.raises(InvalidSlide, match=f"the {reader} reader reads"):
        open_slide(svs.path if target == "file" else dicom_sparse, reader=reader)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_refusals_and_logs_name_neither_the_file_nor_the_folder(tmp_path, dicom_sparse):
    """wsidicom and fsspec log the paths of the files they open or pass over: medserve withholds those messages.

    A handler of the root logger's sees what the server's log handlers see (pytest's caplog also sees what libraries'
    own loggers hold back)."""
    folder = tmp_path / "PATIENT-Jane-Doe-1970"
    shutil.copytree(dicom_sparse, folder)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "Doe^Jane-CT.dcm")
    (folder / "Doe^Jane-notes.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)  # a DICOM preamble, then junk
    root, seen = logging.getLogger(), _Lines()
    level = root.level
    root.addHandler(seen)
    root.setLevel(logging.DEBUG)
    try:
        with open_slide(folder) as slide:  # the slide's instances are read, the others passed over
            assert slide.reader == "wsidicom" and len(slide.levels) == LEVELS
        for path in (folder / "Doe^Jane-CT.dcm", folder / "Doe^Jane-notes.dcm"):
            with pytest.raises(InvalidSlide) as refused:
                open_slide(path)
            assert "Jane" not in refused.value.reason and "PATIENT" not in refused.value.reason
    finally:
        root.removeHandler(seen)
        root.setLevel(level)
    logged = "\n".join(seen.lines)
    assert "withheld" in logged and "Jane" not in logged and "PATIENT" not in logged, logged


# --- a WSI job over the DICOM WSI folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_slides(slide_root, tmp_path_factory) -> dict[str, Path]:
    """An SVS with tumour, and the DICOM WSI OrthancWSIDicomizer makes of it, in the servers' slide root."""
    folder = slide_root / "readers"
    folder.mkdir()
    svs = write_slide(folder / "case.svs", *JOB_SLIDE, mpp=MPP, tile=TILE, levels=LEVELS, seed=3, tumour_fraction=0.5)
    # With a frame of reference (type 1, which OrthancWSIDicomizer leaves to its --dataset): the results stand on it.
    dataset = {**DICOMIZER_DATASET, "FrameOfReferenceUID": generate_uid()}
    dicom = dicomize(svs, folder / "case-dicom", dataset=dataset)
    return {"svs": svs.path, "dicom": dicom, **_bad_slides(folder, dicom)}


# Each bad slide of the job, what its name holds (a patient's name, as files' names may: never logged) and the words of
# its reason.
BAD_SLIDES = {
    "not-a-slide": "not a whole-slide image (its SOP class is CT Image Storage)",
    "two-frames": "disagree on their frame of reference",
    "two-sizes": "disagree on its size",
    "mrxs-alone": "that folder is missing",
    "too-long": "too large to reduce within the memory bound",
}
PATIENT_IN_NAMES = "Doe-Jane-1970"


def _bad_slides(folder: Path, dicom: Path) -> dict[str, Path]:
    """A CT image named as a slide; the DICOM WSI with its level 1 on another frame of reference, and with it of
    another shape; an MRXS without its folder; a one-level TIFF of 400,000 x 256 px, which no band of the memory bound
    reduces (its tissue image would be read 49 rows, 19.6 Mpx, at a time)."""
    paths = {name: folder / f"{PATIENT_IN_NAMES}-{name}" for name in BAD_SLIDES}
    shutil.copy(get_testdata_file("CT_small.dcm"), paths["not-a-slide"])
    level1_width = sorted({ds.TotalPixelMatrixColumns for ds in _instances(dicom)})[-2]
    for name, change in (("two-frames", "FrameOfReferenceUID"), ("two-sizes", "TotalPixelMatrixColumns")):
        shutil.copytree(dicom, paths[name])
        for path in paths[name].iterdir():
            ds = pydicom.dcmread(path)
            if ds.TotalPixelMatrixColumns == level1_width:
                setattr(ds, change, generate_uid() if change == "FrameOfReferenceUID" else level1_width * 4 // 5)
                ds.save_as(path)
    paths["mrxs-alone"] = paths["mrxs-alone"].with_suffix(".mrxs")
    paths["mrxs-alone"].write_text("[GENERAL]\nSLIDE_VERSION = 01.02\n")
    paths["too-long"] = paths["too-long"].with_suffix(".tiff")
    width, strip = 400_000, np.full((256, 8192, 3), 245, np.uint8)
    tifffile.imwrite(
        paths["too-long"],
        (strip for _ in range(-(-width // 8192))),
        shape=(256, width, 3),
        dtype=np.uint8,
        tile=(256, 8192),
        compression="jpeg",
        photometric="rgb",
        resolution=(20_000, 20_000),  # 0.5 µm per pixel
        resolutionunit="CENTIMETER",
    )
    return paths


def test_each_bad_slide_is_refused_with_its_reason_naming_no_file(dicom_sparse, tmp_path):
    """BAD_SLIDES without a cluster: each refused as it is opened, or (the slide too long) as its tissue is sought."""
    from serve_app.wsi.tissue import detect_tissue

    for name, path in _bad_slides(tmp_path, dicom_sparse).items():
        with pytest.raises(InvalidSlide) as refused:
            with open_slide(path) as slide:
                detect_tissue(slide)
        assert BAD_SLIDES[name] in refused.value.reason and PATIENT_IN_NAMES not in refused.value.reason, name


def _stowed(orthanc, folder: Path) -> dict:
    """The DICOM WSI of ``folder`` stored to Orthanc (STOW-RS); the job's slide naming it on PACS ``main``."""
    instances = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    DICOMwebClient(orthanc.dicomweb_url).store_instances(instances)
    uids = {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in instances}
    assert len(uids) == 1
    ((study, series),) = uids
    return {"pacs": "main", "study_instance_uid": study, "series_instance_uid": series}


def test_a_job_reads_a_dicom_wsi_from_a_folder_and_from_the_pacs_as_it_reads_the_svs_and_stores_annotations(
    client, job_slides, orthanc
):
    """One job, three good slides: the SVS, the DICOM WSI made of it in a folder, and the same DICOM WSI on Orthanc
    read over DICOMweb. The three heatmaps agree tile for tile; each slide's tumour regions are in regions.geojson;
    each DICOM slide's tiles and regions come back as Microscopy Bulk Simple Annotations on its image and its heatmap
    as a Parametric Map on its frame of reference, stored to Orthanc (store_to) and read back from there with
    highdicom, value for value. The job's bad slides (BAD_SLIDES) each fail alone with their reason, and no log
    names them."""
    import highdicom as hd
    import zarr

    on_pacs = _stowed(orthanc, job_slides["dicom"])
    body = {
        "model": "he-tile-tumour",
        "slides": [
            str(job_slides["svs"]),
            str(job_slides["dicom"]),
            on_pacs,
            *(str(job_slides[n]) for n in BAD_SLIDES),
        ],
        "store_to": "main",
    }
    submitted = client.post("/v1/wsi/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["job_id"])
    assert job["state"] == "done" and [s["state"] for s in job["slides"][:3]] == ["done"] * 3, job
    for slide, words in zip(job["slides"][3:], BAD_SLIDES.values(), strict=True):
        assert slide["state"] == "failed" and words in slide["error"], (words, slide)
        assert PATIENT_IN_NAMES not in slide["error"]
    assert job["slides"][2]["slide"] == on_pacs
    summaries = [client.get(f"/v1/wsi/jobs/{job['job_id']}/slides/{i}/summary.json").json() for i in range(3)]
    assert [s["reader"] for s in summaries] == ["tifffile", "wsidicom", "wsidicom"]
    assert "Aperio SVS" in summaries[0]["reader_reason"] and "DICOM WSI" in summaries[1]["reader_reason"]
    assert "PACS main" in summaries[2]["reader_reason"] and "DICOMweb" in summaries[2]["reader_reason"]
    assert summaries[1]["reader_notes"] == [] and summaries[1]["levels"][0]["width"] == JOB_SLIDE[0]
    assert summaries[2]["levels"] == summaries[1]["levels"]
    assert summaries[2]["tiles_tissue"] == summaries[1]["tiles_tissue"] == summaries[0]["tiles_tissue"] > 0
    folders = [Path(job["out_path"]) / slide["key"] for slide in job["slides"][:3]]
    heatmaps = [zarr.open_array(folder / "heatmap.zarr", mode="r")[:] for folder in folders]
    # The same JPEG tiles decoded: the same probabilities, tile for tile; by DICOMweb, the same frames (the model's
    # batches may differ, and with them the last bits of its sums).
    np.testing.assert_allclose(heatmaps[1], heatmaps[0], atol=1e-3)
    np.testing.assert_allclose(heatmaps[2], heatmaps[1], atol=1e-5)
    assert np.array_equal(np.isnan(heatmaps[2]), np.isnan(heatmaps[1]))
    assert os.stat(folders[1] / "summary.json").st_mode & 0o077 == 0
    # Regions: regions.geojson beside the tiles' GeoJSON, on every slide.
    tile_um2 = (summaries[0]["tile_size"] * summaries[0]["mpp"]) ** 2
    extent = json.loads((folders[0] / "heatmap.zarr" / "zarr.json").read_text())["attributes"]["tile_extent_level0"]
    regions = [_assert_outlines_the_tumour(folders[i], summaries[i], heatmaps[i], extent, tile_um2) for i in range(3)]
    # DICOM: no annotations for the SVS (no DICOM image to reference), and its probability map on a new frame of
    # reference, not stored (no PACS holds its image); per DICOM slide an annotations object and a map on the
    # slide's frame of reference, stored to Orthanc and read back from there.
    assert not summaries[0]["annotations"] and summaries[0]["stored"] is None
    assert not (folders[0] / "annotations.dcm").exists()
    assert summaries[0]["frame_of_reference"] == "new: the slide is not DICOM"
    _assert_maps_the_heatmap(pydicom.dcmread(folders[0] / "probabilities.dcm"), heatmaps[0])
    assert dciodvfy_ann_errors(folders[0] / "probabilities.dcm", "ParametricMap") == []
    slide_frame = _instances(job_slides["dicom"])[0].FrameOfReferenceUID
    pacs = DICOMwebClient(orthanc.dicomweb_url)
    for index in (1, 2):
        stored = summaries[index]["stored"]
        assert summaries[index]["annotations"] and stored["stored"] and stored["pacs"] == "main", stored
        assert summaries[index]["frame_of_reference"] == "the slide's" and summaries[index]["probability_map"]
        assert {"annotations.dcm", "probabilities.dcm", "regions.geojson"} <= set(summaries[index]["files"])
        written = folders[index] / "annotations.dcm"
        assert os.stat(written).st_mode & 0o077 == 0
        assert (
            client.get(f"/v1/wsi/jobs/{job['job_id']}/slides/{index}/annotations.dcm").content == written.read_bytes()
        )
        local, local_map = pydicom.dcmread(written), pydicom.dcmread(folders[index] / "probabilities.dcm")
        assert stored["sop_instance_uids"] == [local.SOPInstanceUID, local_map.SOPInstanceUID]
        study = on_pacs["study_instance_uid"]
        from_pacs = pacs.retrieve_instance(study, local.SeriesInstanceUID, local.SOPInstanceUID)
        annotations = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(from_pacs)
        _assert_annotates_the_tiles(annotations, heatmaps[index], extent)
        _assert_annotates_the_regions(annotations, regions[index])
        assert [ref.ReferencedSOPInstanceUID for ref in from_pacs.ReferencedImageSequence] == [
            _base_level_instance(job_slides["dicom"])
        ]
        map_from_pacs = pacs.retrieve_instance(study, local_map.SeriesInstanceUID, local_map.SOPInstanceUID)
        _assert_maps_the_heatmap(map_from_pacs, heatmaps[index])
        assert (
            map_from_pacs.FrameOfReferenceUID == slide_frame
        )  # the annotations, in pixel coordinates (2D), carry none
        assert dciodvfy_ann_errors(written) == []
        assert dciodvfy_ann_errors(folders[index] / "probabilities.dcm", "ParametricMap") == []
    assert_no_markers_in_logs([PATIENT_IN_NAMES, on_pacs["study_instance_uid"], on_pacs["series_instance_uid"]])


def _assert_outlines_the_tumour(folder: Path, summary: dict, heatmap: np.ndarray, extent: float, tile_um2: float):
    """regions.geojson: QuPath annotations whose polygons, less their holes, cover exactly the centres of the tumour
    tiles (p >= the threshold) of each 4-connected patch of at least the minimum area, with its area and mean
    probability; returned as (outline, mean probability, area) per region."""
    from scipy import ndimage
    from skimage.measure import points_in_poly

    features = json.loads((folder / "regions.geojson").read_text(encoding="utf-8"))["features"]
    settings = summary["regions"]
    assert settings["count"] == len(features) and settings["threshold"] == 0.5
    tumour = np.nan_to_num(heatmap, nan=0.0) >= settings["threshold"]
    labels, _ = ndimage.label(tumour)
    tiles = np.bincount(labels.ravel())
    expected = tumour & (tiles[labels] * tile_um2 >= settings["min_area_um2"])
    rows, cols = np.indices(heatmap.shape)
    centres = np.column_stack([(cols.ravel() + 0.5) * extent, (rows.ravel() + 0.5) * extent])
    covered, found = np.zeros(heatmap.shape, bool), []
    for feature in features:
        properties, (outline, *holes) = feature["properties"], feature["geometry"]["coordinates"]
        assert properties["objectType"] == "annotation" and properties["classification"]["name"] == "Tumor"
        inside = points_in_poly(centres, outline)
        for hole in holes:
            inside &= ~points_in_poly(centres, hole)
        inside = inside.reshape(heatmap.shape)
        assert not (covered & inside).any()
        covered |= inside
        measurements = properties["measurements"]
        assert measurements["Area µm^2"] == pytest.approx(inside.sum() * tile_um2)
        assert measurements["Mean tumour probability"] == pytest.approx(heatmap[inside].mean(), abs=1e-4)
        found.append((np.array(outline), measurements["Mean tumour probability"], measurements["Area µm^2"]))
    assert np.array_equal(covered, expected)
    return found


def _assert_annotates_the_regions(annotations, regions: list) -> None:
    """The annotations' "Tumour regions" are regions.geojson's outlines, with its probabilities and areas."""
    groups = {group.label: group for group in annotations.get_annotation_groups()}
    if not regions:
        assert "Tumour regions" not in groups
        return
    outlines = groups["Tumour regions"].get_graphic_data(annotations.AnnotationCoordinateType)
    assert [o.tolist() for o in outlines] == [outline[:-1].tolist() for outline, _, _ in regions]
    _, values, _ = groups["Tumour regions"].get_measurements()
    np.testing.assert_allclose(values, [[p, area] for _, p, area in regions], rtol=1e-4)


def _assert_maps_the_heatmap(dataset: pydicom.Dataset, heatmap: np.ndarray) -> None:
    """A Parametric Map whose total pixel matrix is the Zarr heatmap, value for value (NaN where no tissue)."""
    import highdicom as hd

    parametric_map = hd.pm.ParametricMap.from_dataset(dataset)
    values = parametric_map.get_total_pixel_matrix().astype(np.float32)
    assert np.array_equal(values, heatmap, equal_nan=True)


def _base_level_instance(folder: Path) -> str:
    """The SOPInstanceUID of the slide's full-resolution instance."""
    (uid,) = [ds.SOPInstanceUID for ds in _instances(folder) if ds.TotalPixelMatrixColumns == JOB_SLIDE[0]]
    return uid


def _assert_annotates_the_tiles(annotations, heatmap: np.ndarray, extent: float) -> None:
    """One polygon per classified tile, its corners the tile's in level-0 pixels, its probability the heatmap's."""
    assert annotations.AnnotationCoordinateType == "2D" and annotations.Modality == "ANN"
    found = {}
    for group in annotations.get_annotation_groups():
        if group.label not in ("Tumour tiles", "Other tissue tiles"):
            continue
        polygons = group.get_graphic_data(annotations.AnnotationCoordinateType)
        names, values, units = group.get_measurements()  # values: (annotations, measurements)
        assert [name.meaning for name in names] == ["Probability of cancer"] and [unit.value for unit in units] == ["1"]
        assert values.shape == (len(polygons), 1)
        for polygon, (probability,) in zip(polygons, values, strict=True):
            (x0, y0), (x1, y1) = polygon.min(axis=0), polygon.max(axis=0)
            row, col = round(y0 / extent), round(x0 / extent)
            assert (x0, y0, x1, y1) == pytest.approx(
                (col * extent, row * extent, (col + 1) * extent, (row + 1) * extent)
            )
            found[row, col] = probability
    classified = np.argwhere(np.isfinite(heatmap))
    assert len(found) == len(classified) == int(np.isfinite(heatmap).sum()) > 0
    for row, col in classified:
        assert found[row, col] == pytest.approx(heatmap[row, col], abs=1e-6)


def dciodvfy_ann_errors(path: Path, iod: str = "MicroscopyBulkSimpleAnnotations") -> list[str]:
    """dciodvfy's errors for an ANN (or another ``iod``), less one it raises wrongly: dicom3tools of 2022 reports
    CommonZCoordinateValue as "only valid for 3D" in every group of a 2D object that has none (highdicom writes it only
    for 3D ones)."""
    if shutil.which("dciodvfy") is None:
        skip_unless_installed("dciodvfy", "dciodvfy (Debian's dicom3tools) is not installed")
    checked = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    assert [line for line in lines if not line.startswith(("Warning", "Error"))] == [iod]
    return [line for line in lines if line.startswith("Error") and "CommonZCoordinateValue" not in line]


def test_a_pacs_the_server_does_not_have_is_refused_naming_it(client):
    body = {
        "model": "he-tile-tumour",
        "slides": [{"pacs": "elsewhere", "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4"}],
    }
    refused = client.post("/v1/wsi/jobs", json=body)
    assert refused.status_code == 422 and "PACS 'elsewhere' is not configured" in refused.text, refused.text
    refused = client.post("/v1/wsi/jobs", json={"model": "he-tile-tumour", "slides": ["x.svs"], "store_to": "gone"})
    assert refused.status_code == 422 and "PACS 'gone' is not configured" in refused.text, refused.text
    url = {
        "pacs": "main",
        "url": "http://10.0.0.1/dicom-web",
        "study_instance_uid": "1.2",
        "series_instance_uid": "1.3",
    }
    assert client.post("/v1/wsi/jobs", json={"model": "he-tile-tumour", "slides": [url]}).status_code == 422


def test_a_pacs_of_other_tenants_is_refused_naming_it(tenant_config, tmp_path):
    """st-marys may not use PACS `unanswered` (path-lab's and research-lab's): refused at submission, before any
    job starts, whether it holds a slide or is where results would go."""
    from serve_app.errors import Forbidden
    from serve_app.model_repository import ModelRepository
    from serve_app.wsi.job_status import WsiJobRequest
    from serve_app.wsi.jobs import WsiJobs

    config = tenant_config.model_copy(update={"wsi": tenant_config.wsi.model_copy(update={"output_root": tmp_path})})
    jobs = WsiJobs(config, ModelRepository(config.model_repository), {})
    slide = {"pacs": "unanswered", "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4"}
    for body in ({"slides": [slide]}, {"slides": ["case.svs"], "store_to": "unanswered"}):
        request = WsiJobRequest.model_validate({"model": "he-tile-tumour", **body})
        with pytest.raises(Forbidden, match="tenant st-marys may not use PACS 'unanswered'"):
            jobs.submit(request, "0" * 32, "st-marys")
