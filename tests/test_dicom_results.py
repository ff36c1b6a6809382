"""DICOM results of real series: the SEG decodes to the mask on the source's own frames, the SR reports the
volumes and references the SEG, dciodvfy finds no error in either; and the store builds them on first download."""

import json
import shutil
import subprocess
import warnings
from datetime import UTC, datetime, timedelta

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from helpers import skip_unless_installed
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, LimitsConfig
from serve_app.errors import NoDicomResult, ResultNotFound
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelSpec
from serve_app.results import SUMMARY_FILE, ResultStore
from serve_app.results.dicom_seg import build_segmentation
from serve_app.results.dicom_sr import build_measurement_report
from serve_app.results.measurements import LabelVolume
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.dicom_source import DicomSource, SourceFrame
from serve_app.studies.volume import Volume

RESULT_ID = "0123456789abcdef0123456789abcdef"
SHAPE = (24, 20, 9)  # (I, J, K): columns, rows, slices
SPLEEN = {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}
LIVER = {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """The embedded model with labels 3 and 7, not 1..N, so that segment numbers must be remapped."""
    embedded = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")
    labels = {0: "background", 3: {"name": "liver", "code": LIVER}, 7: {"name": "spleen", "code": SPLEEN}}
    return ModelSpec.model_validate({**embedded.model_dump(), "labels": labels})


@pytest.fixture(scope="module")
def volume() -> Volume:
    """A small CT phantom, to be written as a DICOM series (or stored as a NIfTI study's result)."""
    return ct_phantom(np.random.default_rng(7), shape=SHAPE, spacing=(1.5, 1.5, 3.0)).volume


def mask_of(shape) -> np.ndarray:
    """(I, J, K) labels 3 and 7 that differ from slice to slice (a misordered frame shows), some slices empty."""
    mask = np.zeros(shape, np.uint8)
    for k in range(1, 6):
        mask[2 : 4 + 2 * k, 3:9, k] = 3  # grows with k
    mask[15:20, 12 : 12 + 1, 3] = 7
    mask[14:21, 10:16, 4] = 7
    return mask


def series_read_in_order(volume: Volume, folder, order: str) -> Volume:
    """``volume`` written as a series whose files' names and instance numbers follow ``order``, read back."""
    written = write_ct_series(volume, folder / "written")
    permutation = {
        "original": np.arange(len(written)),
        "reversed": np.arange(len(written))[::-1],
        "shuffled": np.random.default_rng(3).permutation(len(written)),
    }[order]
    renamed = []
    for position, k in enumerate(permutation):
        ds = pydicom.dcmread(written[k])
        ds.InstanceNumber = position + 1
        ds.save_as(folder / f"{position:03d}.dcm")
        renamed.append(folder / f"{position:03d}.dcm")
    return read_dicom_series(renamed, LimitsConfig())


def segment_numbers_of(mask: np.ndarray) -> np.ndarray:
    """The mask's labels as the SEG numbers its segments: 3 -> 1, 7 -> 2."""
    return np.select([mask == 3, mask == 7], [1, 2], 0).astype(np.uint8)


def position_of(ds: pydicom.Dataset) -> list[float]:
    return [round(float(v), 3) for v in ds.ImagePositionPatient]


@pytest.mark.parametrize("order", ["original", "reversed", "shuffled"])
def test_seg_holds_the_mask_on_the_source_series_frames(tmp_path, volume, spec, order):
    read = series_read_in_order(volume, tmp_path, order)
    mask = mask_of(read.shape)
    build_segmentation(mask, read.source, spec).save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")

    images = [read.source.instances[part.instance] for part in read.source.slices]
    uids = [image.SOPInstanceUID for image in images]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels, segment_numbers_of(mask).transpose(2, 1, 0))  # (K, rows, columns)

    # Each frame lies where the source image it references lies, and only non-empty frames are stored.
    positions = {image.SOPInstanceUID: position_of(image) for image in images}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert position_of(frame.PlanePositionSequence[0]) == positions[source_uid]
    non_empty = sum(np.any(mask[:, :, k] == label) for label in (3, 7) for k in range(mask.shape[2]))
    assert seg.NumberOfFrames == non_empty
    assert seg.FrameOfReferenceUID == images[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == images[0].StudyInstanceUID and seg.PatientID == images[0].PatientID
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "spleen")]
    spleen = seg.SegmentSequence[1]
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert spleen.SegmentAlgorithmType == "AUTOMATIC"
    assert spleen.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == spec.name


def test_an_empty_mask_is_a_seg_of_empty_frames(tmp_path, volume, spec):
    read = series_read_in_order(volume, tmp_path, "original")
    build_segmentation(np.zeros(read.shape, np.uint8), read.source, spec).save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.NumberOfFrames == 2 * read.shape[2]  # every frame of both segments: a SEG holds at least one
    uids = [read.source.instances[part.instance].SOPInstanceUID for part in read.source.slices]
    assert not seg.get_pixels_by_source_instance(uids, combine_segments=True).any()


def test_no_malformed_patient_value_reaches_a_log_or_a_warning(tmp_path, volume, spec, caplog, monkeypatch):
    # Values other software writes against the standard; pydicom, by default, warns with the value itself
    # ("Invalid value for VR DA: '1902-03-04'") as it reads them, and again as highdicom copies them into the SEG.
    patient = {
        "PatientName": "QXLEAK^PERSON",
        "PatientID": "QXLEAKID-0001",
        "PatientBirthDate": "1902-03-04",
        "PatientSex": "qxleak sex",
        "AccessionNumber": "QXLEAKACCESSION-LONGER-THAN-SH",
    }
    with monkeypatch.context() as writing:
        writing.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
        paths = write_ct_series(volume, tmp_path / "series", patient=patient)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_dicom_series(paths, LimitsConfig())
        mask = mask_of(read.shape)
        seg = build_segmentation(mask, read.source, spec)
        volumes = [
            LabelVolume(label=3, name="liver", volume_ml=1.0),
            LabelVolume(label=7, name="spleen", volume_ml=2.0),
        ]
        build_measurement_report(seg, volumes, read.source, spec).save_as(tmp_path / "sr.dcm")
        seg.save_as(tmp_path / "seg.dcm")
    # A date or a sex highdicom would refuse (a ValueError, once a 500 on download) is left empty; the rest is copied.
    written = pydicom.dcmread(tmp_path / "seg.dcm")
    assert (written.PatientBirthDate, written.PatientSex) == ("", "")
    assert (written.PatientName, written.PatientID) == ("QXLEAK^PERSON", "QXLEAKID-0001")
    assert written.AccessionNumber == patient["AccessionNumber"]
    shown = caplog.text + "\n".join(str(w.message) for w in caught)
    assert not [value for value in ("1902-03-04", "qxleak sex", "QXLEAKACCESSION") if value in shown], shown


def test_sr_reports_each_segments_volume_and_references_it(tmp_path, volume, spec):
    read = series_read_in_order(volume, tmp_path, "shuffled")
    mask = mask_of(read.shape)
    mask[mask == 7] = 0  # spleen empty: 0 mL, its segment without frames
    seg = build_segmentation(mask, read.source, spec)
    voxel_ml = read.voxel_volume_ml
    volumes = [
        LabelVolume(label=3, name="liver", volume_ml=float((mask == 3).sum() * voxel_ml)),
        LabelVolume(label=7, name="spleen", volume_ml=0.0),
    ]
    build_measurement_report(seg, volumes, read.source, spec).save_as(tmp_path / "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm")

    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.finding_type.value for g in groups] == [LIVER["value"], SPLEEN["value"]]
    for group, volume_of_label, segment in zip(groups, volumes, seg.SegmentSequence, strict=True):
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        assert measurement.value == pytest.approx(volume_of_label.volume_ml, rel=1e-12)
        assert measurement.unit.value == "ml" and measurement.unit.scheme_designator == "UCUM"
        assert group.tracking_uid == segment.TrackingUID
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert referenced.referenced_segment_numbers == [segment.SegmentNumber]
    liver_slices = {k for k in range(mask.shape[2]) if (mask[:, :, k] == 3).any()}
    liver_images = {read.source.instances[read.source.slices[k].instance].SOPInstanceUID for k in liver_slices}
    sources = groups[0].referenced_segment.source_images_for_segmentation
    assert {image.referenced_sop_instance_uid for image in sources} == liver_images
    assert not groups[1].referenced_segment.has_source_images()  # empty: the source series instead
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def multi_frame_source() -> tuple[DicomSource, tuple[int, int, int]]:
    """pydicom's enhanced CT of 2 frames, as a volume whose slice 0 is frame 2: not the file's frame order."""
    image = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    shape = (int(image.Columns), int(image.Rows), int(image.NumberOfFrames))
    return DicomSource.of_datasets([image], slices=[SourceFrame(0, 2), SourceFrame(0, 1)]), shape


def test_seg_of_a_multi_frame_source_references_its_frames(tmp_path, spec):
    source, shape = multi_frame_source()
    mask = np.zeros(shape, np.uint8)
    mask[100:300, 200:260, 0] = 3  # slice 0: frame 2
    mask[10:20, 30:90, 1] = 7  # slice 1: frame 1
    build_segmentation(mask, source, spec).save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")

    uid = source.instances[0].SOPInstanceUID
    pixels = seg.get_pixels_by_source_frame(uid, [1, 2], combine_segments=True, assert_missing_frames_are_empty=True)
    expected = segment_numbers_of(mask)
    assert np.array_equal(pixels[0], expected[:, :, 1].T) and np.array_equal(pixels[1], expected[:, :, 0].T)
    referenced = {
        int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber): int(
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        )
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {1: 2, 2: 1}  # liver on frame 2, spleen on frame 1

    volumes = [LabelVolume(label=3, name="liver", volume_ml=1.0), LabelVolume(label=7, name="spleen", volume_ml=2.0)]
    build_measurement_report(seg, volumes, source, spec).save_as(tmp_path / "sr.dcm")
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_volumetric_roi_measurement_groups()
    frames = [group.referenced_segment.source_images_for_segmentation[0].referenced_frame_numbers for group in groups]
    assert frames == [[2], [1]]


def test_seg_of_an_enhanced_image_read_by_the_reader_follows_its_frames(tmp_path, spec):
    """End to end from the file: the reader's slice order (by position) to the SEG's frames (by frame number)."""
    volume = read_dicom_series([get_testdata_file("eCT_Supplemental.dcm")], LimitsConfig())
    mask = np.zeros(volume.shape, np.uint8)
    mask[100:300, 200:260, 0] = 3
    mask[10:20, 30:90, 1] = 7
    build_segmentation(mask, volume.source, spec).save_as(tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uid = volume.source.instances[0].SOPInstanceUID
    pixels = seg.get_pixels_by_source_frame(uid, [1, 2], combine_segments=True, assert_missing_frames_are_empty=True)
    slice_of_frame = {source.frame: k for k, source in enumerate(volume.source.slices)}
    expected = segment_numbers_of(mask)
    for index, frame in enumerate((1, 2)):
        assert np.array_equal(pixels[index], expected[:, :, slice_of_frame[frame]].T), frame


def dciodvfy_errors(path, iod: str) -> list[str]:
    """dciodvfy's errors for the file at ``path``, once it has recognised the file as the IOD named ``iod`` (its
    first line): a crash, an empty output or a file it could not read is no "0 errors"."""
    if shutil.which("dciodvfy") is None:
        skip_unless_installed("dciodvfy", "dciodvfy (Debian's dicom3tools) is not installed")
    checked = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode >= 0, f"dciodvfy was killed by signal {-checked.returncode}"
    lines = (checked.stdout + checked.stderr).splitlines()
    # The IOD's name stands alone on a line among the warnings and errors.
    recognised = [line for line in lines if not line.startswith(("Warning", "Error"))]
    assert recognised == [iod], f"dciodvfy did not recognise {path.name} as {iod}: {lines[:3]}"
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("study", ["series", "empty series", "multi-frame"])
def test_seg_and_sr_pass_dciodvfy(tmp_path, volume, spec, study):
    if study == "multi-frame":
        source, shape = multi_frame_source()
        mask = np.zeros(shape, np.uint8)
        mask[100:300, 200:260, 0] = 7
    else:
        read = series_read_in_order(volume, tmp_path, "shuffled")
        source = read.source
        mask = mask_of(read.shape) if study == "series" else np.zeros(read.shape, np.uint8)
    seg = build_segmentation(mask, source, spec)
    volumes = [LabelVolume(label=3, name="liver", volume_ml=12.5), LabelVolume(label=7, name="spleen", volume_ml=0.0)]
    seg.save_as(tmp_path / "seg.dcm")
    build_measurement_report(seg, volumes, source, spec).save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm", "Segmentation") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm", "Comprehensive3DSR") == []


def stored_result(tmp_path, volume: Volume, spec: ModelSpec, dicom: bool = True) -> ResultStore:
    """A result of ``volume`` stored as the Postprocessor stores it, owned by st-marys."""
    store = ResultStore(tmp_path / "results", retention_hours=1)
    mask = mask_of(volume.shape)
    volumes = [
        LabelVolume(label=k, name=spec.labels[k].name, volume_ml=float((mask == k).sum() * volume.voxel_volume_ml))
        for k in spec.foreground_labels
    ]
    summary = {"labels": [v.model_dump() for v in volumes]}
    source = volume.source if dicom else None
    store.save(RESULT_ID, mask, (0, 0, 0), volume.shape, volume.affine, summary, spec, source)
    store.commit(RESULT_ID, "st-marys")
    return store


def test_the_store_builds_seg_and_sr_once_for_their_tenant(tmp_path, volume, spec):
    read = series_read_in_order(volume, tmp_path, "reversed")
    store = stored_result(tmp_path, read, spec)
    assert store.has_dicom_results(RESULT_ID, "st-marys")
    seg_path = store.seg_path(RESULT_ID, "st-marys")
    sr_path = store.sr_path(RESULT_ID, "st-marys")
    built = seg_path.stat().st_mtime_ns
    assert store.seg_path(RESULT_ID, "st-marys").stat().st_mtime_ns == built  # built once, then served

    seg = hd.seg.segread(seg_path)
    uids = [read.source.instances[part.instance].SOPInstanceUID for part in read.source.slices]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels, segment_numbers_of(mask_of(read.shape)).transpose(2, 1, 0))
    assert seg.ManufacturerModelName == "medserve" and seg.SeriesDescription.startswith(spec.name)

    stored_seg, stored_sr = store.dicom_results(RESULT_ID, "st-marys")
    assert stored_seg.SOPInstanceUID == seg.SOPInstanceUID
    assert stored_sr.SOPInstanceUID == pydicom.dcmread(sr_path).SOPInstanceUID
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    summary = store.summary(RESULT_ID, "st-marys")["labels"]
    assert [g.get_measurements(name=codes.SCT.Volume)[0].value for g in groups] == pytest.approx(
        [label["volume_ml"] for label in summary], rel=1e-12
    )
    assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {seg.SOPInstanceUID}

    with pytest.raises(ResultNotFound):
        store.seg_path(RESULT_ID, "city-general")
    with pytest.raises(ResultNotFound):
        store.dicom_results(RESULT_ID, "city-general")
    summary_path = store.root / RESULT_ID / SUMMARY_FILE  # the result as if made two hours ago
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "created": two_hours_ago}))
    with pytest.raises(ResultNotFound, match="expired"):
        store.sr_path(RESULT_ID, "st-marys")


def test_a_nifti_studys_result_has_no_dicom_results(tmp_path, volume, spec):
    store = stored_result(tmp_path, volume, spec, dicom=False)
    assert not store.has_dicom_results(RESULT_ID, "st-marys")
    for download in (store.seg_path, store.sr_path, store.dicom_results):
        with pytest.raises(NoDicomResult, match="NIfTI study") as raised:
            download(RESULT_ID, "st-marys")
        assert raised.value.status_code == 404
    assert store.mask_path(RESULT_ID, "st-marys").is_file()
