"""medserve's DICOM node without Ray: the listener in this process on an ephemeral loopback port, dcmtk's echoscu,
storescu and storescp as the other side, a real DICOM SEG built from each routed series as its result.

The node's processor here is the test's own (``SegProcessor``): a threshold mask made into a DICOM SEG by
medserve's builder, so the outbox delivers what a real route would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from helpers import free_port, skip_unless_installed, storescu
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, AppConfig, LimitsConfig
from serve_app.dicom_network.delivery import Destinations
from serve_app.dicom_network.inbox import Inbox, ReceivedInstance, uid_key
from serve_app.dicom_network.node import DicomNode
from serve_app.dicom_network.outbox import Outbox, RetryPolicy, SeriesResult
from serve_app.dicom_network.reactor_wakeups import wake_on_work
from serve_app.dicom_network.routing import Route
from serve_app.dicom_network.series import CompletedSeries, SeriesRecord
from serve_app.errors import DimseStatus
from serve_app.model_repository import ModelRepository
from serve_app.results.dicom_seg import build_segmentation
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import DEFAULT_PATIENT, write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.tenancy.audit import AuditLog

MODEL = "ct-phantom-organ"
CALLER = "STORESCU"
STABLE_AFTER_S = 0.5


@pytest.fixture(scope="module", autouse=True)
def _dcmtk():
    if shutil.which("storescu") is None:
        skip_unless_installed("dcmtk", "dcmtk (Debian's dcmtk: echoscu, storescu, storescp) is not installed here")


def ct_series(folder: Path, slices: int = 8, seed: int = 0) -> list[Path]:
    phantom = ct_phantom(np.random.default_rng(seed), shape=(32, 32, slices), spacing=(8.0, 8.0, 5.0))
    return write_ct_series(phantom.volume, folder)


def rewrite(paths: list[Path], **attributes) -> list[Path]:
    """The series given other attributes (a new series UID for all), written in place."""
    series_uid = generate_uid()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        if "SOPClassUID" in attributes:
            ds.file_meta.MediaStorageSOPClassUID = attributes["SOPClassUID"]
        ds.save_as(path)
    return paths


def app_config(root: Path, routes: dict | None = None, destinations: dict | None = None, **network) -> AppConfig:
    return AppConfig.model_validate(
        {
            "storage": {"root": str(root / "storage")},
            "dicom_network": {
                "port": 0,
                "ae_titles": {"MEDSERVE": {"callers": {CALLER: ["127.0.0.1"]}}},
                "stable_after_s": STABLE_AFTER_S,
                "delivery_first_retry_s": 0.2,
                "delivery_max_retry_s": 0.5,
                **network,
            },
            "routes": routes if routes is not None else {"organ": {"match": {"modality": ["CT"]}, "model": MODEL}},
            "destinations": destinations or {},
        }
    )


class SegProcessor:
    """A route's model stood in for by a threshold (HU > 90: the phantom's organ and brighter), made into a real
    DICOM SEG on the series as received. Records each call."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.spec = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL)
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, series: CompletedSeries, route: Route) -> SeriesResult:
        self.calls.append((series.record.series_instance_uid, route.name, len(series.files)))
        volume = read_dicom_series(list(series.files), LimitsConfig())
        seg = build_segmentation((volume.array > 90).astype(np.uint8), volume.source, self.spec)
        result_id = uuid.uuid4().hex
        path = self.folder / f"{result_id}.dcm"
        seg.save_as(path)
        record = series.record
        return SeriesResult(
            record.tenant, record.study_instance_uid, record.series_instance_uid, MODEL, self.spec.version, result_id,
            (path,),
        )  # fmt: skip


@pytest.fixture
def started(tmp_path):
    """Start a node of a config (``started(config)``); each is stopped at the end."""
    nodes = []

    def start(config: AppConfig) -> tuple[DicomNode, SegProcessor]:
        (tmp_path / "results").mkdir(exist_ok=True)
        processor = SegProcessor(tmp_path / "results")
        node = DicomNode(config, processor, AuditLog(config.audit, config.storage.root, "dicom-test"))
        node.start()
        nodes.append(node)
        return node, processor

    yield start
    for node in nodes:
        node.stop()


def echoscu(port: int, calling: str = CALLER):
    command = ["echoscu", "-aet", calling, "-aec", "MEDSERVE", "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def wait_until(predicate, timeout_s: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout_s} s")


def records(node: DicomNode) -> list[SeriesRecord]:
    return [SeriesRecord.load(folder) for _, folder in node.book.inbox.series_folders()]


def audit(config: AppConfig) -> list[dict]:
    folder = config.storage.root / "audit"
    return [json.loads(line) for path in sorted(folder.glob("audit-*.log*")) for line in path.read_text().splitlines()]


def audited(config: AppConfig, outcome: str, count: int) -> list[dict]:
    """The audit lines of ``outcome``, once there are ``count`` (an association's line follows its close)."""
    wait_until(lambda: [x for x in audit(config) if x.get("outcome") == outcome][count - 1 :], what=outcome)
    return [line for line in audit(config) if line.get("outcome") == outcome]


def test_echoscu_gets_an_answer_and_a_caller_not_allowed_is_rejected_and_audited(tmp_path, started):
    config = app_config(tmp_path)
    node, _ = started(config)
    assert echoscu(node.port).returncode == 0
    refused = echoscu(node.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    rejected = audited(config, "rejected", count=1)
    assert rejected == [
        {**rejected[0], "calling_ae_title": "INTRUDER", "called_ae_title": "MEDSERVE", "peer": "127.0.0.1"}
    ]


def test_a_series_sent_by_storescu_lands_whole_is_processed_once_and_a_resend_changes_nothing(tmp_path, started):
    config = app_config(tmp_path)
    node, processor = started(config)
    sent = ct_series(tmp_path / "ct")
    assert storescu(node.port, sent).returncode == 0
    # Every instance is on disk, 0600, as sent (the data set byte for byte: only the file meta is medserve's).
    folder = node.book.inbox.series_folder("anonymous", pydicom.dcmread(sent[0]).SeriesInstanceUID)
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in folder.glob("*.dcm")}
    originals = {pydicom.dcmread(p).SOPInstanceUID: p for p in sent}
    assert stored.keys() == originals.keys()
    for sop_uid, path in stored.items():
        assert path.stat().st_mode & 0o777 == 0o600
        assert pydicom.dcmread(path) == pydicom.dcmread(originals[sop_uid])
    wait_until(lambda: processor.calls, what="the series processed")
    assert storescu(node.port, sent).returncode == 0  # a re-send: every instance is a duplicate
    time.sleep(STABLE_AFTER_S * 3)
    assert [(route, n) for _, route, n in processor.calls] == [("organ", len(sent))]
    assert [r.state for r in records(node)] == ["processed"]
    closed = audited(config, "closed", count=2)
    assert [line["instances"] for line in closed] == [{"stored": len(sent)}, {"duplicate": len(sent)}]
    log = "\n".join(json.dumps(line) for line in audit(config))
    identifiers = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
    assert not any(DEFAULT_PATIENT[keyword] in log for keyword in identifiers)


def test_refusals_answer_their_dimse_status_and_the_listener_carries_on(tmp_path, started):
    node, processor = started(app_config(tmp_path))
    ct = pydicom.dcmread(ct_series(tmp_path / "ct", slices=1)[0])
    no_series = copy.deepcopy(ct)
    del no_series.SeriesInstanceUID
    capture = copy.deepcopy(ct)
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ae = AE(ae_title=CALLER)
    for sop_class in (CTImageStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", node.port, ae_title="MEDSERVE")
    assert association.is_established
    try:
        assert association.send_c_store(no_series).Status == DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        assert association.send_c_store(capture).Status == DimseStatus.SOP_CLASS_NOT_SUPPORTED
        assert association.send_c_store(ct).Status == DimseStatus.SUCCESS
    finally:
        association.release()
    # Bytes that are no DICOM association at all: the connection is dropped, the listener serves the next.
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: medserve\r\n\r\n" + bytes(range(256)) * 64)
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while raw.recv(65536):
                pass
    assert echoscu(node.port).returncode == 0
    wait_until(lambda: processor.calls, what="the one stored instance's series processed")
    assert len(records(node)) == 1


def test_an_instance_over_the_size_limit_gets_out_of_resources_and_smaller_ones_are_stored(tmp_path, started):
    node, _ = started(app_config(tmp_path, limits={"max_instance_bytes": 8_000}))
    small = ct_series(tmp_path / "small", slices=2)  # 32 x 32 slices: about 2 kB each
    assert storescu(node.port, small).returncode == 0
    phantom = ct_phantom(np.random.default_rng(3), shape=(64, 64, 1), spacing=(4.0, 4.0, 5.0))
    large = write_ct_series(phantom.volume, tmp_path / "large")  # 64 x 64: about 8 kB of pixels
    refused = storescu(node.port, large)
    assert refused.returncode != 0 and "Refused: OutOfResources" in refused.stderr
    assert node.book.pending("anonymous")[0] == 2
    assert echoscu(node.port).returncode == 0


def test_a_tenant_over_its_inbox_limit_gets_out_of_resources_while_another_is_served(tmp_path, started):
    def tenant(name: str, key_digit: str) -> dict:
        hashes = ["sha256:" + key_digit * 64]
        return {"name": name, "api_key_hashes": hashes, "models": ["*"], "rate": {"per_second": 1, "burst": 1},
                "max_concurrent": 1}  # fmt: skip

    raw = {
        "storage": {"root": str(tmp_path / "storage")},
        "tenants": {"north": tenant("North", "1"), "south": tenant("South", "2")},
        "dicom_network": {
            "port": 0,
            "stable_after_s": 60,
            "ae_titles": {
                "NORTH": {"tenant": "north", "callers": {CALLER: []}},
                "SOUTH": {"tenant": "south", "callers": {CALLER: []}},
            },
            "limits": {"max_inbox_instances_per_tenant": 5},
        },
    }
    config = AppConfig.model_validate(raw)
    node, _ = started(config)
    flood = storescu(node.port, ct_series(tmp_path / "north", slices=8), called="NORTH")
    assert flood.returncode != 0 and "Refused: OutOfResources" in flood.stderr
    assert node.book.pending("north") == (5, node.book.pending("north")[1])
    # While its inbox is full, the tenant's new associations are rejected (transient) and audited.
    again = storescu(node.port, ct_series(tmp_path / "north-again", slices=1, seed=2), called="NORTH")
    assert again.returncode != 0 and "Local Limit Exceeded" in again.stderr, again.stderr
    (rejected,) = audited(config, "rejected", count=1)
    assert rejected["reason"] == "tenant's inbox is full" and rejected["tenant"] == "north"
    assert storescu(node.port, ct_series(tmp_path / "south", slices=3, seed=1), called="SOUTH").returncode == 0
    assert node.book.pending("south")[0] == 3


def test_routing_takes_the_ct_not_the_scout_or_the_mr_and_a_series_two_routes_match_runs_both(tmp_path, started):
    routes = {
        "organ": {"match": {"modality": ["CT"], "slice_count": {"min": 4}}, "model": MODEL},
        "organ-thin": {"match": {"modality": ["CT"], "slice_thickness_mm": {"max": 5}}, "model": MODEL},
        "portal": {"match": {"series_description": "(?i)portal"}, "model": MODEL},
    }
    config = app_config(tmp_path, routes=routes)
    node, processor = started(config)
    study = generate_uid()
    ct = rewrite(ct_series(tmp_path / "ct"), StudyInstanceUID=study)
    scout = rewrite(
        ct_series(tmp_path / "scout", slices=2), StudyInstanceUID=study, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    mr = rewrite(
        ct_series(tmp_path / "mr", slices=5), StudyInstanceUID=study, Modality="MR", SOPClassUID=MRImageStorage
    )
    assert storescu(node.port, [*ct, *scout, *mr]).returncode == 0
    wait_until(lambda: all(r.state == "processed" for r in records(node)) and len(records(node)) == 3)
    ct_uid = pydicom.dcmread(ct[0]).SeriesInstanceUID
    assert sorted(processor.calls) == [(ct_uid, "organ", 8), (ct_uid, "organ-thin", 8)]
    routed = {r.series_instance_uid: r.routes for r in records(node)}
    assert routed.pop(ct_uid) == {"organ": "processed", "organ-thin": "processed"}
    assert list(routed.values()) == [{}, {}]  # recorded, with no route
    series_lines = [line for line in audit(config) if line["route"] == "dicom-series"]
    assert sorted(line["outcome"] for line in series_lines) == ["no route", "no route", "routed"]


def test_route_config_errors_name_the_field_and_the_bad_value(tmp_path):
    def error_of(routes: dict, destinations: dict | None = None) -> str:
        with pytest.raises(ValueError) as raised:
            app_config(tmp_path, routes=routes, destinations=destinations)
        return str(raised.value)

    unknown_tag = error_of({"ct": {"match": {"tags": {"ConvolutionKernal": "B30"}}, "model": MODEL}})
    assert "routes.ct.match.tags" in unknown_tag and "'ConvolutionKernal'" in unknown_tag
    bad_regex = error_of({"ct": {"match": {"series_description": "(portal"}, "model": MODEL}})
    assert "routes.ct.match.series_description" in bad_regex and "'(portal'" in bad_regex
    no_destination = error_of({"ct": {"match": {}, "model": MODEL, "destinations": ["pacs"]}})
    assert "routes.ct.destinations" in no_destination and "'pacs'" in no_destination
    both = error_of({}, {"pacs": {"dimse": {"host": "127.0.0.1", "port": 104, "ae_title": "PACS"}, "dicomweb": "x"}})
    assert "destinations.pacs" in both and "exactly one" in both


def test_the_outbox_retries_a_pacs_that_is_down_and_delivers_once_after_a_restart(tmp_path):
    pacs_port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    destination = {"pacs": {"dimse": {"host": "127.0.0.1", "port": pacs_port, "ae_title": "PACS", "timeout_s": 5}}}
    config = app_config(tmp_path, destinations=destination)
    deliver = Destinations(config.destinations, config.pacs).deliver
    retry, root = RetryPolicy(attempts=100, first_pause_s=0.2, max_pause_s=0.5), tmp_path / "outbox"
    series = ct_series(tmp_path / "ct")
    seg = SegProcessor(tmp_path)(
        CompletedSeries(SeriesRecord.model_validate(_record_of(series[0])), tmp_path, tuple(series)),
        Route("r", MODEL, None, ()),
    )
    outbox = Outbox(root, deliver, retry)
    outbox.start()
    first = outbox.enqueue(seg, "pacs")
    retried = wait_until(lambda: [d for d in outbox.deliveries() if d.attempts >= 2], what="two failed tries")
    outbox.stop()
    assert retried[0].state == "pending" and "could not be reached" in retried[0].last_error
    # A new outbox over the same folder: the PACS comes up, the delivery goes through, once.
    storescp = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        outbox = Outbox(root, deliver, retry)
        outbox.start()
        delivered = wait_until(lambda: [d for d in outbox.deliveries() if d.state == "delivered"], what="delivery")
        assert delivered[0].id == first.id and delivered[0].attempts > 2
        assert outbox.enqueue(seg, "pacs").state == "delivered"  # the same series and model version: not again
        time.sleep(1)
        outbox.stop()
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
    (stored,) = received.iterdir()
    seg_back = pydicom.dcmread(stored)
    assert seg_back.Modality == "SEG"
    assert seg_back.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(series[0]).SeriesInstanceUID


def _record_of(path: Path) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        "tenant": "anonymous",
        "called_ae_title": "MEDSERVE",
        "calling_ae_title": CALLER,
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "first_received": "2026-01-01T00:00:00Z",
    }


def test_routing_matches_tags_called_ae_and_tenant():
    from serve_app.config.dicom_network import RouteConfig
    from serve_app.dicom_network.routing import SeriesFacts, match_routes

    header = Dataset()
    header.Modality, header.BodyPartExamined, header.SliceThickness = "CT", "ABDOMEN", "1.25"
    header.ImageType, header.ConvolutionKernel, header.ProtocolName = ["ORIGINAL", "PRIMARY", "AXIAL"], "B30f", "Abd"
    facts = SeriesFacts(header, 120, "north", "MEDSERVE")

    def taken(**match) -> bool:
        return bool(match_routes(facts, {"r": RouteConfig.model_validate({"match": match, "model": MODEL})}))

    assert taken(body_part_examined=["abdomen"], image_type_includes=["axial"], tags={"ConvolutionKernel": "^B30"})
    assert taken(protocol_name="^Abd$", slice_thickness_mm={"min": 1, "max": 1.5}, tenants=["north"])
    assert not taken(tags={"ConvolutionKernel": "^B70"})
    assert not taken(called_ae_titles=["OTHER"])
    assert not taken(tenants=["south"])
    assert not taken(slice_count={"max": 100})
    assert not taken(protocol_name="chest")


def test_a_result_as_fhir_validates_with_one_observation_per_label_and_the_study_referenced():
    from datetime import UTC, datetime

    from fhir.resources.R4B.bundle import Bundle

    from serve_app.results.fhir import fhir_report
    from serve_app.results.measurements import LabelVolume

    spec = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL)
    study, result_id = generate_uid(), uuid.uuid4().hex
    bundle = fhir_report(
        result_id, spec, [LabelVolume(label=1, name="organ", volume_ml=152.25)], datetime.now(UTC), study
    )
    parsed = Bundle.model_validate_json(bundle.model_dump_json())  # what an EHR reads back validates as FHIR
    report, observation = (entry.resource for entry in parsed.entry)
    assert report.get_resource_type() == "DiagnosticReport" and report.status == "preliminary"
    assert report.identifier[0].value == f"urn:uuid:{uuid.UUID(hex=result_id)}"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{study}"
    assert [ref.reference for ref in report.result] == [parsed.entry[1].fullUrl]
    assert observation.valueQuantity.value == 152.25 and observation.valueQuantity.code == "mL"
    assert observation.bodySite.coding[0].code == "78961009"  # the model.yaml's SNOMED CT code: spleen


def test_the_inbox_files_an_instance_by_a_link_on_its_own_filesystem_and_by_a_copy_elsewhere(tmp_path):
    inbox = Inbox(tmp_path / "inbox")
    inbox.create_series_folder("anonymous", "1.2.3")
    shm = Path("/dev/shm")
    receiving_folders = [tmp_path, *([shm] if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev else [])]
    for index, receiving in enumerate(receiving_folders):
        received = receiving / f"medserve-test-{uuid.uuid4().hex}.dcm"
        received.write_bytes(b"DICM" * 1000)
        received.chmod(0o644)  # as a receiver that is not medserve's could leave it: what is filed is 0600 still
        try:
            instance = ReceivedInstance("anonymous", "1.2", "1.2.3", f"1.2.3.{index}", received)
            assert inbox.store(instance) is True
            assert inbox.store(instance) is False  # a re-send
            stored = inbox.series_folder("anonymous", "1.2.3") / f"{uid_key(f'1.2.3.{index}')}.dcm"
            assert stored.read_bytes() == received.read_bytes()
            assert stored.stat().st_mode & 0o777 == 0o600
            # On the inbox's filesystem the received file itself is filed (its bytes written once); elsewhere a copy.
            assert stored.samefile(received) is (receiving == tmp_path)
        finally:
            received.unlink()


def test_an_association_s_thread_takes_each_message_as_it_arrives_not_at_its_next_poll():
    """pynetdicom's association thread polls for DIMSE messages once a millisecond (half a millisecond's wait, at
    the median); with ``wake_on_work`` it is woken for each."""
    arrived, handovers = [], []
    handlers = [
        (evt.EVT_CONN_OPEN, lambda event: wake_on_work(event.assoc)),
        (evt.EVT_DIMSE_RECV, lambda event: arrived.append(time.perf_counter())),  # in the DUL thread
        (evt.EVT_C_ECHO, lambda event: handovers.append(time.perf_counter() - arrived[-1]) or DimseStatus.SUCCESS),
    ]
    scp = AE()
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        scu = AE()
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1])
        assert assoc.is_established
        for _ in range(60):
            assert assoc.send_c_echo().Status == DimseStatus.SUCCESS
        assoc.release()
    finally:
        server.shutdown()
    assert np.median(handovers) < 0.35e-3, f"median handover {np.median(handovers) * 1e3:.2f} ms"
