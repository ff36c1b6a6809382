"""medserve beside a real PACS: Orthanc (Debian's orthanc + orthanc-dicomweb) on loopback.

A series stored in Orthanc is segmented by UID and its DICOM SEG and SR stored back, then read from Orthanc
and compared voxel for voxel with the NIfTI mask; Orthanc pushes a study to medserve's STOW-RS endpoint;
Orthanc stopped, or cut off half-way, gives a 502/503 with Retry-After and leaves nothing half-made.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from helpers import MODEL, SEGMENT, assert_no_markers_in_logs, load_mask
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series

STOW = f"/dicomweb/{MODEL}/studies"
PATIENT = {
    "PatientName": "QXPACSNAME^TESTPERSON",
    "PatientID": "QXPACSID-5521",
    "PatientBirthDate": "19030405",
    "PatientSex": "O",
    "AccessionNumber": "QXPACSACC-881",
}


def _series(tmp_path_factory, name: str, seed: int = 10_020, **write_options) -> list[Path]:
    phantom = ct_phantom(np.random.default_rng(seed))
    return write_ct_series(phantom.volume, tmp_path_factory.mktemp(name), patient=PATIENT, **write_options)


def _uids(paths: list[Path]) -> tuple[str, str]:
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def _in_slice_order(paths: list[Path]) -> list[pydicom.Dataset]:
    """The series' headers along the slice normal: slice k of the mask is the k-th."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    row, column = np.reshape(np.asarray(headers[0].ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    return sorted(headers, key=lambda h: float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)))


def _stow_body(paths: list[Path], boundary: str = "medserve-test-boundary") -> tuple[bytes, dict]:
    body = io.BytesIO()
    for path in paths:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(path.read_bytes())
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body.getvalue(), {"content-type": content_type}


@pytest.fixture(scope="module")
def stored_series(orthanc, tmp_path_factory) -> list[Path]:
    """A CT series STOWed into Orthanc by a real DICOMweb client."""
    paths = _series(tmp_path_factory, "pacs-series")
    DICOMwebClient(orthanc.dicomweb_url).store_instances([pydicom.dcmread(p) for p in paths])
    return paths


def _segment_from_pacs(client: httpx.Client, paths: list[Path], pacs: str = "main", **more) -> httpx.Response:
    study, series = _uids(paths)
    order = {"pacs": pacs, "study_instance_uid": study, "series_instance_uid": series, **more}
    return client.post(SEGMENT, json=order)


def test_a_series_segmented_by_uid_is_stored_back_and_its_seg_in_orthanc_equals_the_mask(
    client, orthanc, stored_series
):
    response = _segment_from_pacs(client, stored_series, store_results=True)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["pacs_store"]["stored"] is True, answer["pacs_store"]
    assert answer["seg_url"].endswith("/seg.dcm") and answer["sr_url"].endswith("/sr.dcm")
    mask = np.asarray(load_mask(client, answer).dataobj)
    assert mask.any()

    pacs = DICOMwebClient(orthanc.dicomweb_url)
    study, _ = _uids(stored_series)
    by_modality = {
        pydicom.Dataset.from_json(s).Modality: pydicom.Dataset.from_json(s).SeriesInstanceUID
        for s in pacs.search_for_series(study)
    }
    assert set(by_modality) == {"CT", "SEG", "SR"}
    (seg_dataset,) = pacs.retrieve_series(study, by_modality["SEG"])
    assert seg_dataset.SOPInstanceUID in answer["pacs_store"]["sop_instance_uids"]
    seg = hd.seg.Segmentation.from_dataset(seg_dataset)
    sources = _in_slice_order(stored_series)
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(h.SOPInstanceUID) for h in sources], combine_segments=True
    )
    # (slices, rows, columns) against the NIfTI mask's (columns, rows, slices), voxel for voxel.
    assert np.array_equal(frames, mask.transpose(2, 1, 0))

    (sr_dataset,) = pacs.retrieve_series(study, by_modality["SR"])
    assert sr_dataset.SOPInstanceUID in answer["pacs_store"]["sop_instance_uids"]


def test_the_cli_segments_a_pacs_series_by_uid(server_url, stored_series):
    from helpers import medserve

    study, series = _uids(stored_series)
    done = medserve("segment", "--pacs", "main", "--study", study, "--series", series, "--url", server_url)
    assert done.returncode == 0, done.stderr
    assert '"seg_url"' in done.stdout
    both = medserve("segment", str(stored_series[0].parent), "--pacs", "main", "--url", server_url)
    assert both.returncode == 2 and "not both" in both.stderr


def test_orthanc_pushes_a_series_to_medserve_and_gets_its_seg_and_sr_back(
    client, orthanc, app_config, tmp_path_factory
):
    paths = _series(tmp_path_factory, "pushed", seed=10_021)
    DICOMwebClient(orthanc.dicomweb_url).store_instances([pydicom.dcmread(p) for p in paths])
    study, series = _uids(paths)
    before = set(app_config.storage.results.iterdir())
    orthanc.push("medserve-and-back", series)
    (made,) = set(app_config.storage.results.iterdir()) - before
    summary = client.get(f"/v1/results/{made.name}")
    assert summary.status_code == 200 and summary.json()["labels"][0]["volume_ml"] > 0
    modalities = {
        pydicom.Dataset.from_json(s).Modality for s in DICOMwebClient(orthanc.dicomweb_url).search_for_series(study)
    }
    assert modalities == {"CT", "SEG", "SR"}


def test_a_stow_rs_client_gets_a_standard_answer_pointing_at_the_result(server_url, client, tmp_path_factory):
    paths = _series(tmp_path_factory, "stowed", seed=10_022)
    answer = DICOMwebClient(f"{server_url}/dicomweb/{MODEL}").store_instances([pydicom.dcmread(p) for p in paths])
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
    assert stored == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert "FailedSOPSequence" not in answer
    result_path = httpx.URL(answer.RetrieveURL).path
    seg = client.get(f"{result_path}/seg.dcm")
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(seg.content)).Modality == "SEG"


def test_a_stopped_pacs_gives_503_with_retry_after_and_the_server_keeps_serving(client, orthanc, stored_series):
    orthanc.stop()
    try:
        response = _segment_from_pacs(client, stored_series)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert "PACS main is unreachable" in response.json()["error"]["reason"]
        assert client.get("/healthz").status_code == 200
    finally:
        orthanc.start()
    assert _segment_from_pacs(client, stored_series).status_code == 200


def test_a_retrieval_cut_half_way_leaves_no_partial_result(client, cutting_relay, stored_series, app_config):
    before = set(app_config.storage.results.iterdir())
    response = _segment_from_pacs(client, stored_series, pacs="cut")
    assert response.status_code == 502, response.text  # the PACS answered, but not whole (the docs' 502)
    assert "retry-after" in response.headers
    assert cutting_relay.cuts >= 1
    assert set(app_config.storage.results.iterdir()) == before
    assert not any(app_config.storage.uploads.iterdir())


def test_a_failed_store_back_is_retried_and_the_result_stays_downloadable(client, orthanc, stored_series):
    made = _segment_from_pacs(client, stored_series, store_results=False)
    assert made.status_code == 200, made.text
    result_id = made.json()["result_id"]
    orthanc.stop()
    # Back after the first attempt has failed: the store-back's later attempts find it.
    restart = threading.Timer(1.5, orthanc.start)
    restart.start()
    try:
        stored = client.post(f"/v1/results/{result_id}/store", json={"pacs": "main"})
    finally:
        restart.join()
    assert stored.status_code == 200, stored.text
    assert stored.json()["stored"] is True and stored.json()["attempts"] >= 2

    orthanc.stop()
    try:
        started = time.monotonic()
        failed = client.post(f"/v1/results/{result_id}/store", json={"pacs": "main"})
        assert failed.status_code == 503 and "attempt 4" in failed.json()["error"]["reason"], failed.text
        assert time.monotonic() - started >= 1 + 2 + 4  # the pauses between the four attempts
        assert client.get(f"/v1/results/{result_id}/seg.dcm").status_code == 200
    finally:
        orthanc.start()


@pytest.mark.parametrize(
    ("order", "status", "reason"),
    [
        ({"pacs": "elsewhere"}, 422, "a PACS this server does not have (configured: cut, main)"),
        ({"pacs": "http://169.254.169.254/dicom-web"}, 422, "a PACS this server does not have"),
        ({"url": "http://169.254.169.254/dicom-web"}, 422, "url: Extra inputs are not permitted"),
        ({"study_instance_uid": "1.2.3 OR 1=1"}, 422, "study_instance_uid: String should match pattern"),
    ],
)
def test_a_pacs_request_names_only_configured_servers(client, stored_series, order, status, reason):
    study, series = _uids(stored_series)
    body = {"pacs": "main", "study_instance_uid": study, "series_instance_uid": series, **order}
    response = client.post(SEGMENT, json=body)
    assert response.status_code == status and reason in response.json()["error"]["reason"], response.text


def test_a_series_the_pacs_does_not_have_is_404(client, orthanc):
    order = {"pacs": "main", "study_instance_uid": "1.2.3.4", "series_instance_uid": "1.2.3.4.5"}
    response = client.post(SEGMENT, json=order)
    assert response.status_code == 404 and "PACS main has no such" in response.json()["error"]["reason"]


def test_bad_stow_bodies_get_clear_errors(client, tmp_path_factory):
    paths = _series(tmp_path_factory, "stow-bad", seed=10_023)
    other = _series(tmp_path_factory, "stow-other", seed=10_024)
    body, headers = _stow_body(paths)
    cases = {
        "not multipart": (
            client.post(STOW, content=paths[0].read_bytes(), headers={"content-type": "application/dicom"}),
            415,
        ),
        "json parts": (
            client.post(
                STOW,
                content=body,
                headers={"content-type": 'multipart/related; type="application/dicom+json"; boundary=x'},
            ),
            415,
        ),
        "no boundary": (
            client.post(STOW, content=body, headers={"content-type": 'multipart/related; type="application/dicom"'}),
            400,
        ),
        "truncated": (client.post(STOW, content=body[: len(body) // 2], headers=headers), 400),
        "not DICOM": (client.post(STOW, content=_stow_body_of([b"%PDF-1.4 not an image"]), headers=headers), 415),
        "two series": (client.post(STOW, content=_stow_body(paths + other)[0], headers=headers), 422),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert response.json()["error"]["reason"], case
    assert client.post(STOW, content=body, headers=headers).status_code == 200  # still serving


def _stow_body_of(parts: list[bytes], boundary: str = "medserve-test-boundary") -> bytes:
    chunks = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def test_an_unsupported_transfer_syntax_is_415_naming_it(client, tmp_path_factory):
    (path, *_) = _series(tmp_path_factory, "mpeg", seed=10_025)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3 not really a video"])
    ds.save_as(path, enforce_file_format=True)
    response = client.post(STOW, content=_stow_body([path])[0], headers=_stow_body([path])[1])
    assert response.status_code == 415, response.text
    assert "1.2.840.10008.1.2.4.100" in response.json()["error"]["reason"]


def test_no_patient_data_from_the_pacs_paths_reaches_a_log(client, stored_series):
    study, _ = _uids(stored_series)
    assert _segment_from_pacs(client, stored_series, pacs="elsewhere").status_code == 422
    unknown = {"pacs": "main", "study_instance_uid": study, "series_instance_uid": "9.9"}
    assert client.post(SEGMENT, json=unknown).status_code == 404
    markers = [v for k, v in PATIENT.items() if k != "PatientSex"] + ["QXPACSNAME", study]
    assert_no_markers_in_logs(markers)
