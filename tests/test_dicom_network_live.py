"""The DICOM node on the test cluster, with Orthanc as the hospital's PACS.

The test server's config has a ``dicom_network`` section (conftest's ``dicom_node_sections``): AE title MEDSERVE,
which Orthanc (AE ORTHANC) may send to, a route taking CT series of 8 slices or more to the embedded model, and
Orthanc's own AE as the route's destination. Orthanc knows medserve as its DicomModality ``medserve``; a CT series
STOWed into Orthanc is C-STOREd to medserve (``POST /modalities/medserve/store``), routed by its tags, segmented
by the same stages as an HTTP request, and its DICOM SEG and SR are C-STOREd back to Orthanc, where the test reads
them and compares the SEG with the NIfTI mask voxel for voxel. Orthanc stopped before the delivery (a modality,
dcmtk's storescu, sends the series meanwhile): the outbox retries until it is back, and ``GET /v1/deliveries``
shows the attempts.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle

from helpers import auth, load_mask, medserve, node_port, skip_unless_installed
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series

MODALITY = "medserve"


@pytest.fixture
def pacs(orthanc, app_config, server_url):
    """Orthanc, with medserve's DICOM node as its DicomModality ``medserve``."""
    node = {"AET": "MEDSERVE", "Host": "127.0.0.1", "Port": node_port(app_config.name)}
    httpx.put(f"{orthanc.url}/modalities/{MODALITY}", json=node, timeout=10).raise_for_status()
    return orthanc


def _ct_series(folder: Path, seed: int, **attributes) -> list[Path]:
    """A CT series of the embedded model's phantom, with ``attributes`` set on every instance."""
    paths = write_ct_series(ct_phantom(np.random.default_rng(seed)).volume, folder)
    if attributes:
        for path in paths:
            ds = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    return paths


def _uids(paths: list[Path]) -> tuple[str, str]:
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def _send_through_orthanc(orthanc, paths: list[Path]) -> tuple[str, str]:
    """STOW the series into Orthanc, then have Orthanc C-STORE it to medserve; its study and series UIDs."""
    DICOMwebClient(orthanc.dicomweb_url).store_instances([pydicom.dcmread(p) for p in paths])
    study, series = _uids(paths)
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=series, timeout=30).json()
    orthanc_id = next(item["ID"] for item in found if item["Type"] == "Series")
    store = {"Resources": [orthanc_id], "Synchronous": True}
    answer = httpx.post(f"{orthanc.url}/modalities/{MODALITY}/store", json=store, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["FailedInstancesCount"] == 0, answer.json()
    return study, series


def _delivery(client: httpx.Client, series: str, until, timeout_s: float = 120) -> dict:
    """The delivery of ``series``'s result once ``until(delivery)`` holds."""
    deadline = time.monotonic() + timeout_s
    found = None
    while time.monotonic() < deadline:
        deliveries = client.get("/v1/deliveries").json()["deliveries"]
        found = next((d for d in deliveries if d["series_instance_uid"] == series), None)
        if found is not None and until(found):
            return found
        time.sleep(0.25)
    raise AssertionError(f"the delivery of the series did not reach the expected state in {timeout_s} s: {found}")


def _in_slice_order(paths: list[Path]) -> list[pydicom.Dataset]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    row, column = np.reshape(np.asarray(headers[0].ImageOrientationPatient, dtype=float), (2, 3))
    normal = np.cross(row, column)
    return sorted(headers, key=lambda h: float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)))


def _results_in_orthanc(orthanc, study: str) -> dict[str, pydicom.Dataset]:
    pacs = DICOMwebClient(orthanc.dicomweb_url)
    by_modality = {}
    for found in pacs.search_for_series(study):
        series = pydicom.Dataset.from_json(found)
        if series.Modality in ("SEG", "SR"):
            (by_modality[series.Modality],) = pacs.retrieve_series(study, series.SeriesInstanceUID)
    return by_modality


def test_orthanc_c_stores_a_ct_series_and_gets_its_seg_and_sr_back_equal_to_the_mask(pacs, client, tmp_path):
    paths = _ct_series(tmp_path / "ct", seed=30_001)
    study, series = _send_through_orthanc(pacs, paths)
    delivery = _delivery(client, series, until=lambda d: d["state"] != "pending")
    assert delivery["state"] == "delivered", delivery
    assert delivery["model"] == "ct-phantom-organ" and delivery["files"] == 2 and delivery["destination"] == "orthanc"

    mask = np.asarray(load_mask(client, {"mask_url": f"/v1/results/{delivery['result_id']}/mask.nii.gz"}).dataobj)
    assert mask.any()
    stored = _results_in_orthanc(pacs, study)
    assert set(stored) == {"SEG", "SR"}
    seg = hd.seg.Segmentation.from_dataset(stored["SEG"])
    sources = [str(h.SOPInstanceUID) for h in _in_slice_order(paths)]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, combine_segments=True)
    assert np.array_equal(frames, mask.transpose(2, 1, 0))  # (slices, rows, columns) against (columns, rows, slices)

    fhir = client.get(f"/v1/results/{delivery['result_id']}/fhir")
    assert fhir.status_code == 200 and fhir.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(fhir.json())
    report = bundle.entry[0].resource
    assert report.get_resource_type() == "DiagnosticReport"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{study}"
    assert len(bundle.entry) == 1 + len(client.get(f"/v1/results/{delivery['result_id']}").json()["labels"])

    listed = medserve("deliveries", "--state", "delivered", "--url", str(client.base_url))
    assert listed.returncode == 0 and delivery["id"] in listed.stdout, listed.stderr


def test_a_result_for_a_stopped_orthanc_is_delivered_when_it_is_back_and_the_retries_are_listed(
    pacs, client, app_config, tmp_path
):
    if shutil.which("storescu") is None:
        skip_unless_installed("dcmtk", "dcmtk (Debian's dcmtk: storescu) is not installed here")
    paths = _ct_series(tmp_path / "ct", seed=30_002)
    study, series = _uids(paths)
    pacs.stop()
    try:  # the modality sends straight to medserve (dcmtk's storescu) while the PACS is down
        sent = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "MEDSERVE", "127.0.0.1", str(node_port(app_config.name))]
            + [str(path) for path in paths],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        retried = _delivery(client, series, until=lambda d: d["attempts"] >= 2)
        assert retried["state"] == "pending" and retried["last_error"], retried
    finally:
        pacs.start()
    delivered = _delivery(client, series, until=lambda d: d["state"] == "delivered")
    assert delivered["attempts"] >= 3 and delivered["id"] == retried["id"]
    assert set(_results_in_orthanc(pacs, study)) == {"SEG", "SR"}

    again = client.post(f"/v1/deliveries/{delivered['id']}/resend")
    assert again.status_code == 200 and again.json()["state"] == "pending"
    assert _delivery(client, series, until=lambda d: d["state"] == "delivered")["attempts"] == 1
    assert client.post(f"/v1/deliveries/{'0' * 32}/resend").status_code == 404


def _stow(client: httpx.Client, paths: list[Path]) -> httpx.Response:
    boundary = "medserve-routed"
    body = io.BytesIO()
    for path in paths:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return client.post("/dicomweb/studies", content=body.getvalue(), headers={"content-type": content_type})


def test_a_stow_rs_push_naming_no_model_is_routed_as_a_c_store_is(pacs, client, tmp_path):
    routed = _stow(client, _ct_series(tmp_path / "ct", seed=30_003))
    assert routed.status_code == 200, routed.text
    result_url = routed.json()["00081190"]["Value"][0]
    assert routed.headers["location"] == result_url and client.get(result_url).status_code == 200
    study, series = _uids(list((tmp_path / "ct").iterdir()))
    assert _delivery(client, series, until=lambda d: d["state"] == "delivered")["result_id"] in result_url

    scout = _stow(client, _ct_series(tmp_path / "scout", seed=30_004, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert scout.status_code == 200, scout.text
    assert "00081190" not in scout.json() and "location" not in scout.headers


def test_the_node_killed_is_restarted_by_serve_with_its_deliveries_and_answers_again(pacs, client, app_config):
    import ray
    from ray.exceptions import RayActorError

    before = client.get("/v1/deliveries").json()["deliveries"]
    prefix = f"SERVE_REPLICA::{app_config.name}#DicomNode#"
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the DICOM node did not answer C-ECHO again within 120 s"
        try:
            port = node_port(app_config.name)  # the new replica's: any free port, as configured
        except (RayActorError, TimeoutError):  # the dead replica, until Serve has replaced it
            continue
        echo = ["echoscu", "-aet", "STORESCU", "-aec", "MEDSERVE", "127.0.0.1", str(port)]
        if subprocess.run(echo, capture_output=True, timeout=30).returncode == 0:
            break
        time.sleep(0.5)
    after = client.get("/v1/deliveries")
    assert after.status_code == 200
    assert {d["id"] for d in before} <= {d["id"] for d in after.json()["deliveries"]}


def test_a_tenants_deliveries_are_its_own_and_another_tenant_can_neither_see_nor_resend_them(
    pacs, tenant_url, tenant_config, tenant_keys, tmp_path
):
    paths = _ct_series(tmp_path / "ct", seed=30_005)
    _, series = _uids(paths)
    port = str(node_port(tenant_config.name))
    sent = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "STMARYS", "127.0.0.1", port, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr
    with (
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys["st-marys"]), timeout=60) as owner,
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys["city-general"]), timeout=60) as other,
    ):
        delivery = _delivery(owner, series, until=lambda d: d["state"] == "delivered")
        assert delivery["tenant"] == "st-marys"
        assert other.get("/v1/deliveries").json()["deliveries"] == []
        assert other.post(f"/v1/deliveries/{delivery['id']}/resend").status_code == 404
        assert other.get(f"/v1/results/{delivery['result_id']}/fhir").status_code == 404
        assert owner.get(f"/v1/results/{delivery['result_id']}/fhir").status_code == 200
        assert httpx.get(f"{tenant_url}/v1/deliveries", timeout=60).status_code == 401
