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

import copy
import io
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from helpers import auth, exported_total, load_mask, medserve, node_port, skip_unless_installed, storescu
from serve_app.dicom_network.inbox import uid_key
from serve_app.errors import DimseStatus
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series

MODALITY = "medserve"
MODEL = "ct-phantom-organ"
_TCP_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a C-STORE's answer is not held back by Nagle


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


def _routed_series_observed() -> float:
    """Routed DICOM series whose stages' seconds the latency histogram has observed (its ``total`` stage)."""
    return exported_total(
        "ray_medserve_request_duration_seconds_count", stage="total", model=MODEL, tenant="anonymous", route="dicom"
    )


def test_orthanc_c_stores_a_ct_series_and_gets_its_seg_and_sr_back_equal_to_the_mask(pacs, client, tmp_path):
    observed_before = _routed_series_observed()
    paths = _ct_series(tmp_path / "ct", seed=30_001)
    study, series = _send_through_orthanc(pacs, paths)
    delivery = _delivery(client, series, until=lambda d: d["state"] != "pending")
    assert delivery["state"] == "delivered", delivery
    # The series' stages are in the same latency histogram as an HTTP segment request's, told apart by route.
    deadline = time.monotonic() + 30  # Ray exports metrics every few seconds
    while _routed_series_observed() < observed_before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _routed_series_observed() >= observed_before + 1
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
        sent = storescu(node_port(app_config.name), paths)
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
    sent = storescu(node_port(tenant_config.name), paths, called="STMARYS")
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


# The flood: conftest's tenant app holds 100 instances a tenant in its node's inbox; city-general's AE title CITYGEN
# (no route takes its series) gets 10,000 instances from one caller over four associations, while st-marys (AE title
# STMARYS) is answered C-ECHO and C-STORE and the ingress answers HTTP.
FLOOD_INSTANCES = 10_000
FLOOD_ASSOCIATIONS = 4
INBOX_LIMIT = 100


def _flood_folders(folder: Path) -> tuple[list[Path], pydicom.Dataset]:
    """``FLOOD_INSTANCES`` 8x8 CT instances of one series in ``FLOOD_ASSOCIATIONS`` folders, and their header: one
    encoded file copied with only its SOP Instance UID changed (written in a second, not encoded 10,000 times)."""
    phantom = ct_phantom(np.random.default_rng(30_006), shape=(8, 8, 1), spacing=(8.0, 8.0, 5.0))
    (template,) = write_ct_series(phantom.volume, folder / "template")
    header = pydicom.dcmread(template)
    root = generate_uid()[:50]
    header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = placeholder = f"{root}.999999"
    header.save_as(template)
    encoded = template.read_bytes()
    assert encoded.count(placeholder.encode()) == 2
    folders = [folder / f"part-{k}" for k in range(FLOOD_ASSOCIATIONS)]
    for part in folders:
        part.mkdir()
    for number in range(FLOOD_INSTANCES):
        instance = encoded.replace(placeholder.encode(), f"{root}.1{number:05d}".encode())
        (folders[number % FLOOD_ASSOCIATIONS] / f"{number:05d}.dcm").write_bytes(instance)
    return folders, header


def _dcmsend_statuses(report: Path) -> dict[str, str]:
    """SOP Instance UID -> DIMSE status, from a ``dcmsend +crf`` report."""
    statuses, sop_instance = {}, None
    for line in report.read_text().splitlines():
        if line.startswith("SOP Instance  :"):
            sop_instance = line.split(":", 1)[1].strip()
        elif line.startswith("DIMSE Status  :"):
            statuses[sop_instance] = line.split(":", 1)[1].split()[0]
    return statuses


class _Probes:
    """st-marys's side while city-general floods: rounds of a C-ECHO and a C-STORE (an MR instance of a new series:
    no route takes it) on one association to STMARYS, and an HTTP request to the ingress; the seconds of each."""

    def __init__(self, port: int, tenant_url: str, key: str, header: pydicom.Dataset):
        self.header = header
        self.http = httpx.Client(base_url=tenant_url, headers=auth(key), timeout=60)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        no_delay = (evt.EVT_CONN_OPEN, lambda event: event.assoc.dul.socket.socket.setsockopt(*_TCP_NODELAY))
        self.association = ae.associate("127.0.0.1", port, ae_title="STMARYS", evt_handlers=[no_delay])
        assert self.association.is_established

    def rounds(self, until: threading.Event, at_least: int) -> dict[str, list[float]]:
        """Rounds, a tenth of a second apart, until ``until`` is set and ``at_least`` were made; their seconds."""
        seconds = {"echo": [], "store": [], "http": []}

        def timed(kind: str, call, *args):
            started = time.perf_counter()
            answer = call(*args)
            seconds[kind].append(time.perf_counter() - started)
            return answer

        while not until.is_set() or len(seconds["echo"]) < at_least:
            assert timed("echo", self.association.send_c_echo).Status == DimseStatus.SUCCESS
            instance = copy.deepcopy(self.header)
            instance.Modality, instance.SOPClassUID = "MR", MRImageStorage
            instance.file_meta.MediaStorageSOPClassUID = MRImageStorage
            instance.SeriesInstanceUID = generate_uid()
            instance.SOPInstanceUID = instance.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            assert timed("store", self.association.send_c_store, instance).Status == DimseStatus.SUCCESS
            assert timed("http", self.http.get, "/v1/models").status_code == 200
            time.sleep(0.1)
        return seconds

    def close(self) -> None:
        self.association.release()
        self.http.close()


def test_a_10000_instance_flood_from_one_caller_is_refused_fast_and_another_tenant_is_not_slowed(
    tenant_url, tenant_config, tenant_keys, tmp_path
):
    if shutil.which("dcmsend") is None:
        skip_unless_installed("dcmtk", "dcmtk (Debian's dcmtk: dcmsend) is not installed here")
    folders, header = _flood_folders(tmp_path / "flood")
    port = node_port(tenant_config.name)
    probes = _Probes(port, tenant_url, tenant_keys["st-marys"], header)
    try:
        now = threading.Event()
        now.set()
        baseline = probes.rounds(now, at_least=15)
        flooded, during = threading.Event(), {}
        prober = threading.Thread(target=lambda: during.update(probes.rounds(flooded, at_least=15)))
        prober.start()
        # dcmsend, not storescu: storescu stops at its first refused instance, as a sender should; a flood does not.
        reports = [tmp_path / f"report-{k}.txt" for k in range(FLOOD_ASSOCIATIONS)]
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [
                    "dcmsend",
                    "-nh",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "CITYGEN",
                    "127.0.0.1",
                    str(port),
                    "+sd",
                    str(folder),
                    "+crf",
                    str(report),
                    "-ll",
                    "error",
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for folder, report in zip(folders, reports, strict=True)
        ]
        for sender in senders:
            sender.wait(timeout=180)
        flood_s = time.monotonic() - started
        flooded.set()
        prober.join(timeout=120)
    finally:
        probes.close()

    statuses = {uid: status for report in reports for uid, status in _dcmsend_statuses(report).items()}
    assert len(statuses) == FLOOD_INSTANCES
    acknowledged = {uid for uid, status in statuses.items() if status == "0x0000"}
    refused = [uid for uid, status in statuses.items() if status.lower() == "0xa700"]
    assert len(acknowledged) + len(refused) == FLOOD_INSTANCES  # nothing answered otherwise, nothing cut off
    # The tenant's limit, and a few more each time the series went quiet (nothing stored for stable_after_s: it is
    # processed, no longer counted, and its next instances open it again), one per association at most; and nothing
    # acknowledged lost.
    quiet_spells = flood_s / tenant_config.dicom_network.stable_after_s
    assert INBOX_LIMIT <= len(acknowledged) <= INBOX_LIMIT + FLOOD_ASSOCIATIONS * (1 + quiet_spells)
    inbox = tenant_config.dicom_network.folder_under(tenant_config.storage.root, tenant_config.name) / "inbox"
    series_folder = inbox / "city-general" / uid_key(str(header.SeriesInstanceUID))
    on_disk = {path.name for path in series_folder.iterdir() if path.name != "series.json"}
    assert on_disk == {f"{uid_key(uid)}.dcm" for uid in acknowledged}
    # Refused unread (no write, no fsync): at CPU pace, many times the pace of durable stores.
    assert len(refused) / flood_s > 150, f"{len(refused)} refusals in {flood_s:.1f} s"
    for kind in ("echo", "store", "http"):
        before, meanwhile = statistics.median(baseline[kind]), statistics.median(during[kind])
        print(f"{kind}: median {before * 1000:.1f} ms before the flood, {meanwhile * 1000:.1f} ms during it")
        assert meanwhile <= 5 * before + 0.05, (kind, baseline[kind], during[kind])
        assert max(during[kind]) < 2.0, (kind, during[kind])
