"""A series' headers parsed in worker processes (``HeaderProcesses``) read to the same volume and source as in one
process, in any file order; a bad file's reason comes back from the process that parsed it; a killed worker costs
no request. The headers kept for results are the files' own bytes up to the pixel data. Real files, real processes;
no Ray (tests/test_layouts.py reads series through replicas that have such processes)."""

import multiprocessing
import os
import signal
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.dicom_source import DicomSource, header_bytes
from serve_app.studies.header_processes import MIN_FILES_PER_PROCESS, HeaderProcesses
from serve_app.studies.upload import sort_upload


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 48-slice series: three runs of 16 files, so that two processes both get work."""
    volume = ct_phantom(np.random.default_rng(10_020), shape=(64, 64, 48)).volume
    return write_ct_series(volume, tmp_path_factory.mktemp("series"))


@pytest.fixture(scope="module")
def parsers():
    processes = HeaderProcesses(2)
    processes.warm_up()
    yield processes
    processes.close()


def test_series_parsed_in_processes_reads_as_in_one_process(series, parsers):
    assert len(series) >= 2 * MIN_FILES_PER_PROCESS
    alone = read_dicom_series(series, LimitsConfig())
    shuffled = list(series)
    np.random.default_rng(3).shuffle(shuffled)
    parallel = read_dicom_series(shuffled, LimitsConfig(), parsers)
    np.testing.assert_array_equal(parallel.array, alone.array)
    np.testing.assert_allclose(parallel.affine, alone.affine)
    assert parallel.source.headers == alone.source.headers
    assert [ds.InstanceNumber for ds in parallel.source.instances] == list(range(1, len(series) + 1))


def test_a_series_stored_in_a_zip_is_read_in_place_in_processes_as_its_files_are(series, parsers, tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    with zipfile.ZipFile(folder / "000000", "w", zipfile.ZIP_STORED) as zf:
        for path in series[::-1]:
            zf.write(path, path.name)
    contents = sort_upload(folder, LimitsConfig())
    assert {file.path for file in contents.dicom} == {folder / "000000"}
    assert sorted(file.size for file in contents.dicom) == sorted(path.stat().st_size for path in series)
    assert not any((folder / "000000.unzipped").iterdir())  # nothing unpacked
    alone = read_dicom_series(series, LimitsConfig())
    in_place = read_dicom_series(contents.dicom, LimitsConfig(), parsers)
    np.testing.assert_array_equal(in_place.array, alone.array)
    np.testing.assert_allclose(in_place.affine, alone.affine)
    assert in_place.source.headers == alone.source.headers


def test_a_multi_frame_image_zipped_among_a_series_is_refused_from_the_processes(series, parsers, tmp_path):
    # Parsed in a process, the multi-frame entry comes back as its dataset: unpacked to a file of its own first,
    # as an archive entry cannot be reopened by name to read its deferred elements there.
    enhanced = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    enhanced.SeriesInstanceUID = pydicom.dcmread(series[0]).SeriesInstanceUID  # one series: refused as multi-frame
    enhanced.save_as(tmp_path / "enhanced.dcm")
    folder = tmp_path / "upload"
    folder.mkdir()
    with zipfile.ZipFile(folder / "000000", "w", zipfile.ZIP_STORED) as zf:
        for path in [*series, tmp_path / "enhanced.dcm"]:
            zf.write(path, path.name)
    contents = sort_upload(folder, LimitsConfig())
    with pytest.raises(InvalidStudy, match="multi-frame DICOM images are not supported in an upload of several"):
        read_dicom_series(contents.dicom, LimitsConfig(), parsers)


def test_a_bad_file_is_refused_with_its_reason_from_the_process_that_parsed_it(series, parsers, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    paths = []
    for k, path in enumerate(series):
        ds = pydicom.dcmread(path)
        if k == len(series) - 1:  # in the last process's run
            ds.PhotometricInterpretation = "RGB"
        paths.append(folder / path.name)
        ds.save_as(paths[-1])
    with pytest.raises(InvalidStudy, match="not grey-scale"):
        read_dicom_series(paths, LimitsConfig(), parsers)


def test_a_killed_parsing_process_costs_no_request(series, caplog):
    parsers = HeaderProcesses(2)
    try:
        others = set(multiprocessing.active_children())
        parsers.warm_up()
        workers = list(set(multiprocessing.active_children()) - others)
        assert workers, "the pool's processes are children of this one"
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].join(timeout=10)
        reference = read_dicom_series(series, LimitsConfig())
        for _ in range(2):  # the series the death is noticed in, then one through the restarted pool
            np.testing.assert_array_equal(read_dicom_series(series, LimitsConfig(), parsers).array, reference.array)
        assert "a DICOM header process died" in caplog.text
        assert len(set(multiprocessing.active_children()) - others - set(workers)) == 2, "a new pool's processes"
    finally:
        parsers.close()


def test_kept_header_is_the_file_up_to_its_pixel_data(series):
    with open(series[0], "rb") as stream:
        ds = pydicom.dcmread(stream, defer_size=1024)
        kept = header_bytes(ds, stream)
    assert series[0].read_bytes().startswith(kept) and len(kept) < series[0].stat().st_size - 64 * 64 * 2
    parsed = DicomSource(headers=[kept], slices=[]).instances[0]
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in parsed


def test_big_endian_header_is_written_anew_without_pixels():
    path = Path(get_testdata_file("MR_small_bigendian.dcm"))
    with open(path, "rb") as stream:
        ds = pydicom.dcmread(stream, defer_size=1024)
        kept = header_bytes(ds, stream)
    parsed = DicomSource(headers=[kept], slices=[]).instances[0]
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in parsed
    assert not path.read_bytes().startswith(kept)


def test_source_survives_being_saved_and_loaded(series, tmp_path):
    source = read_dicom_series(series, LimitsConfig()).source
    source.save(tmp_path / "source.json")
    loaded = DicomSource.load(tmp_path / "source.json")
    assert loaded.headers == source.headers and loaded.slices == source.slices
